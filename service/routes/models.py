"""The served models: GET /v1/models, /v1/models/{name} (classes, input shape, purifier, calibration, batching) and
/v1/models/{name}/card (the checkpoint's MODEL_CARD.md)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from ..auth import PROTECTED
from ..certify import DEFAULT_ALPHA, SELECTION_SAMPLES
from ..config import ServiceSettings
from ..dependencies import Runtime
from ..errors import documented, not_found
from ..runtime import ModelRuntime, ServiceRuntime
from ..schemas import (
    ADAPTIVE_ATTACKS,
    BLIND_ATTACKS,
    RESULTS_PAGE,
    BatchingInfo,
    CertifyInfo,
    ErrorResponse,
    ModelInfo,
    ModelList,
    PurifierInfo,
    RobustnessInfo,
)

MODEL_CARD_FILE = "MODEL_CARD.md"  # next to the weights (training/model_card.py writes it)

router = APIRouter(dependencies=PROTECTED)


@router.get("/v1/models", response_model=ModelList, summary="Loaded models")
async def list_models(runtime: Runtime) -> ModelList:
    return ModelList(default=runtime.default, models=[describe(runtime, m) for m in runtime.models.values()])


@router.get(
    "/v1/models/{name}",
    response_model=ModelInfo,
    responses=documented(ErrorResponse, 404),
    summary="One model: classes, input shape, task, purifier, calibration, metrics",
)
async def model_info(name: str, runtime: Runtime) -> ModelInfo:
    return describe(runtime, runtime.get(name))


@router.get(
    "/v1/models/{name}/card",
    response_class=Response,
    responses={200: {"content": {"text/markdown": {"schema": {"type": "string"}}}}, **documented(ErrorResponse, 404)},
    summary="The model card (MODEL_CARD.md): evaluation, limitations, licence",
)
async def model_card(name: str, runtime: Runtime) -> Response:
    model = runtime.get(name)
    card = model.loaded.path / MODEL_CARD_FILE
    if not card.is_file():
        raise not_found(f"model {model.name} has no {MODEL_CARD_FILE}")
    return Response(card.read_bytes(), media_type="text/markdown; charset=utf-8")


def describe(runtime: ServiceRuntime, model: ModelRuntime) -> ModelInfo:
    """What GET /v1/models/{name} says about a model."""
    meta = model.loaded.meta
    purifier = model.loaded.purifier
    calibration = None
    if meta.calibration is not None:
        calibration = {**meta.calibration.model_dump(), "suspicious_threshold": meta.calibration.suspicious_threshold}
    s = runtime.settings
    return ModelInfo(
        name=model.name,
        default=model.name == runtime.default,
        network=meta.network,
        dataset=meta.dataset,
        aux_task=meta.aux_task,
        num_classes=len(meta.class_names),
        class_names=meta.class_names,
        input_shape=list(meta.input_shape),
        device=str(model.device),
        ready=model.ready,
        aux_head_trained=model.purifies,
        modes=[*model.modes, "certify"] if model.certify is not None else list(model.modes),
        default_mode=model.default_mode,
        purifier=PurifierInfo(
            step_size=purifier.step_size,
            steps=purifier.steps,
            budget_step=purifier.budget_step,
            num_budgets=purifier.num_budgets,
            budgets=model.budgets,
            max_budget=purifier.max_budget,
        ),
        certify=certify_info(model, s),
        robustness=RobustnessInfo(
            purifies=model.purifies,
            resists=BLIND_ATTACKS if model.purifies else None,
            does_not_resist=ADAPTIVE_ATTACKS if model.purifies else "adversarial examples of any kind (no defence)",
            results=RESULTS_PAGE,
            model_card=f"/v1/models/{model.name}/card",
        ),
        calibration=calibration,
        metrics=meta.metrics,
        training=meta.training.model_dump(mode="json"),
        batching=BatchingInfo(
            max_batch_size=s.max_batch_size,
            max_delay_ms=s.max_delay_ms,
            max_queue=s.max_queue,
            queue_depth=model.batcher.depth,
        ),
    )


def certify_info(model: ModelRuntime, settings: ServiceSettings) -> CertifyInfo | None:
    """How mode=certify certifies with this model (GET /v1/models and the v2 model metadata); None: it cannot."""
    if model.certify is None:
        return None
    return CertifyInfo(
        sigma=model.certify.sigma,
        clamp=model.certify.clamp,
        n0=SELECTION_SAMPLES,
        default_samples=settings.default_certify_samples,
        max_samples=settings.max_certify_samples,
        default_alpha=DEFAULT_ALPHA,
    )
