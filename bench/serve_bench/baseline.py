"""The baseline `care-bench serve` measures care-serve against (issue 17): a minimal FastAPI server as a user would
write one around the same backbone. It is part of the benchmark, not of the product.

`POST /predict` takes the same multipart `images` parts as care-serve's, decodes and preprocesses them with the
product's own `Preprocessor` (the same decoder, transform and limits, so decoding costs the same), then runs the
frozen backbone and a random linear head over its pooled feature in the request: a plain sync endpoint (FastAPI runs
it on its thread pool), no routing, no batching across requests, no decode pool. It answers the top-k classes of
each image as JSON. `GET /readyz` answers 200 once it listens (the backbone is loaded before).

    python -m bench.serve_bench.baseline --host 127.0.0.1 --port 8001 [--backbone NAME] [--backbone-weights W]
        [--image-size N] [--threads N] [--classes N] [--seed N]

The backbone, its weights, the image size, the device and the torch threads default to the CARE_ variables, read as
care-serve reads them (CARE_BACKBONE, CARE_BACKBONE_WEIGHTS, CARE_IMAGE_SIZE, CARE_DEVICE, CARE_SERVE_THREADS), so
started with a care-serve server's environment it serves the same backbone on the same number of threads.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, Query, UploadFile
from fastapi.responses import JSONResponse

from model.backbone import make_transform
from service.errors import ApiError
from service.inference.acceleration import Acceleration
from service.inference.backbone import load_backbone
from service.inference.preprocess import Preprocessor
from service.ingest.limits import upload_limits
from service.settings import Settings


def create_app(settings: Settings, classes: int = 1000, seed: int = 0) -> FastAPI:
    """The baseline app: `settings`' backbone (loaded now), a linear head of `classes` random classes seeded by
    `seed`, and `settings`' serve_threads torch threads."""
    torch.set_num_threads(settings.serve_threads)
    config, backbone = load_backbone(settings)
    device = settings.torch_device()
    backbone.eval()
    head = torch.nn.Linear(backbone.feature_dim, classes)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        head.weight.copy_(torch.randn(classes, backbone.feature_dim, generator=generator) / backbone.feature_dim**0.5)
        head.bias.zero_()
    head.to(device).eval()
    labels = [f"class-{index}" for index in range(classes)]
    # The same GPU-path switches as the served app (pinned copies, nvjpeg, bf16, channels-last), so that a ratio
    # compares the routing and the head, not the switches; CARE_COMPILE compiles the served trunk only.
    acceleration = Acceleration.from_settings(settings)
    acceleration.prepare(backbone)
    transform = make_transform(backbone, config.image_size)
    preprocess = Preprocessor(transform, upload_limits(settings), device, acceleration=acceleration)

    app = FastAPI(title="care-bench baseline")

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/predict", response_model=None)
    def predict(
        images: Annotated[list[UploadFile], File()], top_k: Annotated[int, Query(ge=1, le=100)] = 5
    ) -> dict[str, Any] | JSONResponse:
        files = [(image.filename or f"image-{index}", image.file.read()) for index, image in enumerate(images)]
        try:
            batch = preprocess(files)
        except ApiError as error:
            return JSONResponse({"error": error.code, "message": error.message}, status_code=error.status)
        with torch.inference_mode(), acceleration.autocast():
            probabilities = head(backbone.forward_plain(batch)).float().softmax(dim=1)
            scores, indices = probabilities.topk(min(top_k, classes), dim=1)
        return {
            "predictions": [
                [{"label": labels[i], "score": s} for i, s in zip(row_indices, row_scores, strict=True)]
                for row_indices, row_scores in zip(indices.tolist(), scores.tolist(), strict=True)
            ]
        }

    return app


def settings_from(args: argparse.Namespace) -> Settings:
    """CARE_ variables, with the flags that were given winning."""
    given = {
        "backbone": args.backbone,
        "backbone_weights": args.backbone_weights,
        "image_size": args.image_size,
        "serve_threads": args.threads,
    }
    return Settings(**{name: value for name, value in given.items() if value is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_bench.baseline", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--backbone", help="timm name (default: CARE_BACKBONE or care-serve's default)")
    parser.add_argument("--backbone-weights", help="default: CARE_BACKBONE_WEIGHTS or care-serve's default")
    parser.add_argument("--image-size", type=int, help="default: CARE_IMAGE_SIZE or the backbone's pretrained size")
    parser.add_argument("--threads", type=int, help="torch threads (default: CARE_SERVE_THREADS or care-serve's)")
    parser.add_argument("--classes", type=int, default=1000, help="classes of the random linear head")
    parser.add_argument("--seed", type=int, default=0, help="seeds the linear head")
    return parser


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    app = create_app(settings_from(args), args.classes, args.seed)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
