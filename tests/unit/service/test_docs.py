"""The documentation says what the code does: every setting's documented default is its default, every documented
metric series is registered with the documented type and labels, every documented endpoint is served (and every
served one documented), and docs/api.md starts with the design contract."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from model.backbone import WEIGHTS_BUNDLED, WEIGHTS_HUB, bundled_weights_available
from service.app import create_app
from service.housekeeping import data_dir_usage
from service.metrics import JobSnapshot, Metrics
from service.routers.cache import TieredLRUCache
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
CODE_ONLY = re.compile(r"^`[^`]*`( / `[^`]*`)*( \((?P<size>\d+) (?P<unit>MiB|GiB)\))?$")
UNITS = {"MiB": 1 << 20, "GiB": 1 << 30}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CARE_"):
            monkeypatch.delenv(key)


def readme_settings_table() -> dict[str, str]:
    """CARE_ variable -> the text of its default column, from the README's configuration table."""
    rows: dict[str, str] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`CARE_"):
            continue
        names = re.findall(r"`(CARE_[A-Z0-9_]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1]) if CODE_ONLY.match(cells[1]) else None
        if defaults is not None and len(defaults) != len(names):
            raise AssertionError(f"README row {cells[0]}: {len(names)} variables but {len(defaults)} defaults")
        for k, name in enumerate(names):
            assert name not in rows, f"{name} has two rows in the README"
            rows[name] = cells[1] if defaults is None or len(names) == 1 else f"`{defaults[k]}`"
    return rows


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def field(variable: str) -> str:
    return variable.removeprefix("CARE_").lower()


# Defaults the README states in words: the words, and what they mean in the code.
PROSE_DEFAULTS: dict[str, tuple[str, Callable[[Settings], bool]]] = {
    "CARE_BACKBONE_WEIGHTS": (
        "bundled if available, else `hub`",
        lambda s: s.backbone_weights == (WEIGHTS_BUNDLED if bundled_weights_available(s.backbone) else WEIGHTS_HUB),
    ),
    "CARE_SITES": ("the backbone's default", lambda s: s.sites == []),
    "CARE_IMAGE_SIZE": ("the backbone's pretrained size", lambda s: s.image_size is None),
    "CARE_SERVE_THREADS": ("half the cores", lambda s: s.serve_threads == max(1, cpus() // 2)),
    "CARE_TRAIN_THREADS": ("the other cores", lambda s: s.train_threads == max(1, cpus() - s.serve_threads)),
    "CARE_ADMIN_TOKEN": ("empty (off)", lambda s: s.admin_token is None),
    "CARE_API_KEY": ("empty (off)", lambda s: s.api_key is None),
    "CARE_REGISTRY_URL": ("empty (the directory `<data dir>/registry`)", lambda s: s.registry_url is None),
    "CARE_REGISTRY_ENDPOINT_URL": ("empty (AWS)", lambda s: s.registry_endpoint_url is None),
    "CARE_JOBS_URL": (
        "empty (the SQLite file `<data dir>/jobs.sqlite3`)",
        lambda s: s.jobs_url is None and s.jobs_database == s.data_dir / "jobs.sqlite3",
    ),
}


def test_the_readme_table_has_exactly_the_settings() -> None:
    documented = set(readme_settings_table())
    variables = {f"CARE_{name.upper()}" for name in Settings.model_fields}
    assert not variables - documented, f"README.md's configuration table lacks {sorted(variables - documented)}"
    assert not documented - variables, f"README.md documents settings that do not exist: {documented - variables}"


def test_every_documented_default_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    wrong = []
    for variable, text in readme_settings_table().items():
        name = field(variable)
        match = CODE_ONLY.match(text)
        if match is None:
            assert variable in PROSE_DEFAULTS, f"{variable}: default {text!r} in words; say what it means here"
            words, check = PROSE_DEFAULTS[variable]
            assert text == words, f"{variable}: the README now says {text!r}; check what that means here"
            assert check(defaults), f"{variable}: the default is not {text!r}"
            continue
        value = re.findall(r"`([^`]*)`", text)[0]
        # The documented value, given as the variable, must give what leaving the variable unset gives.
        with monkeypatch.context() as patch:
            patch.setenv(variable, value)
            documented = getattr(Settings(), name)
        if documented != getattr(defaults, name):
            wrong.append(f"{variable}: README says {value!r}, the default is {getattr(defaults, name)!r}")
        if match.group("size") is not None:  # e.g. `268435456` (256 MiB): the two must agree
            size = int(match.group("size")) * UNITS[match.group("unit")]
            if size != int(value):
                wrong.append(f"{variable}: {value} is not {match.group('size')} {match.group('unit')}")
    assert not wrong, wrong
    assert set(PROSE_DEFAULTS) <= set(readme_settings_table())


# ---- metrics --------------------------------------------------------------------------------------------------


def registered_families(tmp_path: Path) -> dict[str, tuple[str, set[str], dict[str, set[str]]]]:
    """name -> (type, label names, values seen per label) of every family the server's Metrics object exports."""
    cache: TieredLRUCache[str, bytes] = TieredLRUCache(size_of=len, device_capacity_bytes=1024, host_capacity_bytes=1)
    statuses = ("queued", "training", "ready", "failed")
    metrics = Metrics(cache.stats, lambda: JobSnapshot(dict.fromkeys(statuses, 0), [1.0]))
    metrics.watch_data_dir(lambda: data_dir_usage(Settings(data_dir=tmp_path)))
    metrics.predict_requests.labels(code="200").inc()
    families = {}
    for family in metrics.registry.collect():
        labels: dict[str, set[str]] = {}
        for sample in family.samples:
            for key, value in sample.labels.items():
                if key != "le":
                    labels.setdefault(key, set()).add(value)
        families[family.name] = (family.type, set(labels), labels)
    return families


DOCUMENTED_SERIES = re.compile(r"`(care_[a-z_]*[a-z])(\{[^}`]*\})?`")


def documented_series() -> list[tuple[str, str, str]]:
    """(file, series as written, its label part) of every backticked series in the README and docs/."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name, labels in DOCUMENTED_SERIES.findall(path.read_text()):
            found.append((path.name, name, labels))
    return found


def test_every_documented_series_is_registered_with_its_type_and_labels(tmp_path: Path) -> None:
    families = registered_families(tmp_path)
    documented = documented_series()
    assert len({name for _, name, _ in documented}) >= 15, "the docs' series were not found: the test would be empty"
    wrong = []
    labelled: set[str] = set()
    for source, name, label_text in documented:
        family = name.removesuffix("_total") if name.endswith("_total") else name
        if family not in families:
            wrong.append(f"{source}: {name} is not registered")
            continue
        kind, label_names, values = families[family]
        if name.endswith("_total") != (kind == "counter"):
            wrong.append(f"{source}: {name} is a {kind}: its series is {family}{'_total' if kind == 'counter' else ''}")
        if label_text:
            inner = label_text[1:-1].replace("\\|", "|").replace('"|"', "|")  # a table's `"hit"\|"miss"`
            documented_labels = dict(re.findall(r'(\w+)(?:="([^"]*)")?', inner))
            if set(documented_labels) != label_names:
                wrong.append(f"{source}: {name}{label_text}, but its labels are {sorted(label_names)}")
            for label, text in documented_labels.items():
                alternatives = set(text.split("|")) if text else set()
                if label not in values or not alternatives:
                    continue
                # One value is a selector (`{tier="device"}`); several are the whole list (`{result="hit|miss"}`).
                if not alternatives <= values[label] or (len(alternatives) > 1 and alternatives != values[label]):
                    wrong.append(f"{source}: {name} {label} takes {sorted(values[label])}, not {text}")
            labelled.add(family)
    unlabelled = {name for name, (_, label_names, _) in families.items() if label_names} - labelled
    documented_names = {name.removesuffix("_total") for _, name, _ in documented}
    for family in sorted(unlabelled & documented_names):
        wrong.append(f"{family} has labels {sorted(families[family][1])} that no document names")
    assert not wrong, "\n".join(wrong)


# ---- endpoints ------------------------------------------------------------------------------------------------

ENDPOINT = re.compile(r"`(GET|POST|PUT|PATCH|DELETE|OPTIONS) (/[^`\s?]*)")


def normalised(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_every_documented_endpoint_is_served_and_every_served_one_documented() -> None:
    schema = create_app(Settings(backbone="test_vit", backbone_weights="random")).openapi()
    served = {(method.upper(), normalised(path)) for path, ops in schema["paths"].items() for method in ops}
    documented = set()
    for source in (ROOT / "README.md", ROOT / "docs" / "api.md"):
        for method, path in ENDPOINT.findall(source.read_text()):
            if method != "OPTIONS":  # answered for every path (405's Allow), never an operation of the schema
                documented.add((method, normalised(path)))
    assert len(documented) >= 8, "the docs' endpoints were not found: the test would be empty"
    assert not documented - served, f"documented but not served: {sorted(documented - served)}"
    assert not served - documented, f"served but not documented in docs/api.md: {sorted(served - documented)}"


def test_readme_shows_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme


def test_docs_api_starts_with_the_design_contract() -> None:
    design = ROOT.parent / "shared" / "design" / "api.md"
    if not design.is_file():
        pytest.skip("the design folder is not beside this checkout")
    assert (ROOT / "docs" / "api.md").read_text().startswith(design.read_text())
