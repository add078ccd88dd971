"""Where a care-serve server's threads spend their samples: a py-spy raw profile (`--format raw --threads`) summed
by thread and by what the stack is doing, as a markdown table (issue 17's profiles in docs/benchmarks.md).

    python tools/summarize_pyspy.py profile.txt
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

# First match wins, tested against the whole stack (frames joined by ";"); the leaf-only waits come first so that a
# thread parked in a queue is not counted as doing the work its caller does.
CATEGORIES: list[tuple[str, str]] = [
    # A pool thread blocked in its work queue's C-level get shows `_worker` as its leaf frame.
    (
        "waiting (queue, event, select)",
        r"(Condition\.wait|EpollSelector\.select|Event\.wait|Queue\.get|^_worker|;_worker)[^;]*$",
    ),
    ("routed experts and routers (fast_moe)", r"fast_moe"),
    ("analytic head", r"AnalyticHead"),
    ("decode and preprocess", r"decode_image|_decode_tensor|Preprocessor|resize_image|normalize|center_crop|_to_float"),
    ("backbone layers", r"Module\._call_impl|forward_site|forward_plain|\.embed "),
    # uvloop runs the loop in C: its epoll waits and socket I/O show `Runner.run` as the leaf (not separable).
    ("event loop in C (uvloop: socket I/O or epoll wait)", r"Runner\.run[^;]*$"),
    ("HTTP, multipart, JSON (event loop)", r"h11_impl|starlette|fastapi|multipart|json|uvicorn"),
]


def thread_name(first_frame: str) -> str:
    name = first_frame.split(": ", 1)[1] if ": " in first_frame else first_frame
    return re.sub(r"_\d+$", "", name)  # care-decode_0, care-decode_1 -> care-decode


def summarize(lines: list[str]) -> dict[str, Counter[str]]:
    by_thread: dict[str, Counter[str]] = defaultdict(Counter)
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        body = ";".join(frames[1:])
        category = next((label for label, pattern in CATEGORIES if re.search(pattern, body)), "other Python")
        by_thread[thread_name(frames[0])][category] += int(count)
    return by_thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    args = parser.parse_args()
    with open(args.profile) as source:
        by_thread = summarize(source.readlines())
    print("| thread | what | samples | share of the thread's non-waiting samples |")  # noqa: T201 - the table
    print("|---|---|---|---|")  # noqa: T201
    for thread, counts in sorted(by_thread.items(), key=lambda item: -sum(item[1].values())):
        busy = sum(n for label, n in counts.items() if not label.startswith("waiting")) or 1
        for label, samples in counts.most_common():
            share = "-" if label.startswith("waiting") else f"{samples / busy:.0%}"
            print(f"| {thread} | {label} | {samples} | {share} |")  # noqa: T201


if __name__ == "__main__":
    main()
