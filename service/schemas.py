"""Typed request options and response bodies of the HTTP API (these are what /docs shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models import Mode


class ClassifyOptions(BaseModel):
    """Options of POST /classify, from the query string, multipart text fields or the JSON body."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model name (checkpoint folder name); default: the first model")
    mode: Mode | Literal["certify"] | None = Field(
        None,
        description="min-aux: per-image budget search (SOAP); fixed: purify at `epsilon`; none: no purification; "
        "certify: randomized smoothing, a prediction with a certified L2 radius (no purification). "
        "Default: the model's `default_mode` (min-aux; none for a model whose auxiliary head was not trained, "
        "which refuses the other purification modes with 422)",
    )
    epsilon: float | None = Field(
        None, ge=0, description="L-inf budget for mode=fixed, at most the model's largest budget"
    )
    top_k: int = Field(
        5, ge=1, le=1000, description="how many classes to list per image (capped at the number of classes)"
    )
    return_purified: bool = Field(False, description="include the purified image as base64 PNG")
    return_curve: bool = Field(False, description="include the auxiliary loss at every evaluated budget")
    samples: int | None = Field(
        None, ge=1, description="mode=certify: noise samples per image to estimate p_A (default 10,000; server limit)"
    )
    alpha: float | None = Field(
        None, gt=0, lt=0.5, description="mode=certify: failure probability of each certificate (default 0.001)"
    )
    seed: int = Field(0, ge=0, le=2**62, description="mode=certify: noise seed (image i uses seed + i)")

    @model_validator(mode="after")
    def _epsilon_goes_with_fixed(self) -> ClassifyOptions:
        if self.mode == "fixed" and self.epsilon is None:
            raise ValueError(
                "option epsilon is required with mode=fixed: the L-inf budget, from 0 to the model's largest"
            )
        if self.mode != "fixed" and self.epsilon is not None:
            raise ValueError(
                f"option epsilon is only used with mode=fixed (mode is {self.mode or 'the model default'})"
            )
        if self.mode != "certify" and (self.samples is not None or self.alpha is not None):
            raise ValueError(
                "options samples and alpha are only used with mode=certify "
                f"(mode is {self.mode or 'the model default'})"
            )
        return self


class ClassifyJSON(BaseModel):
    """JSON body of POST /classify: base64 images (optionally as data: URLs) plus any option."""

    model_config = ConfigDict(extra="allow")

    images: list[str] = Field(min_length=1, description="base64-encoded image files")


class TopKEntry(BaseModel):
    label: int
    class_name: str
    probability: float


class ImageResult(BaseModel):
    label: int = Field(description="predicted class of the purified image")
    class_name: str
    confidence: float = Field(description="softmax probability of `label`")
    top_k: list[TopKEntry]
    epsilon: float = Field(description="purification budget used (L-inf, pixels in [0, 1])")
    aux_loss: float = Field(description="auxiliary loss after purification")
    aux_loss_before: float = Field(description="auxiliary loss of the input as received")
    suspicious: bool = Field(
        description="aux_loss_before above the model's calibrated clean quantile "
        "(always false for a model without calibration)"
    )
    purified_png: str | None = Field(None, description="purified image, base64 PNG (return_purified=true)")
    aux_curve: list[float] | None = Field(
        None,
        description="auxiliary loss at each evaluated budget (return_curve=true): "
        "the model's budget grid for min-aux, [0, epsilon] for fixed, [0] for none",
    )


class Timing(BaseModel):
    queue: float = Field(description="ms waiting for a batch")
    compute: float = Field(description="ms of the batch's purification and classification")
    total: float = Field(description="ms from request start to response")


class ClassifyResponse(BaseModel):
    request_id: str
    model: str
    results: list[ImageResult]
    timing_ms: Timing


class CertifiedImage(BaseModel):
    """mode=certify: the smoothed classifier's answer for one image (Cohen et al. 2019, CERTIFY)."""

    label: int | None = Field(description="smoothed prediction; null when abstaining")
    class_name: str | None
    certified_radius: float | None = Field(
        description="L2 radius (pixels in [0, 1]) within which the smoothed prediction provably does not change, "
        "with probability ≥ 1 − alpha over the noise; null when abstaining"
    )
    abstained: bool = Field(description="p_lower ≤ 1/2: no certificate (and no prediction) for this image")
    p_lower: float = Field(description="one-sided Clopper–Pearson lower bound on the top class's probability")
    sigma: float = Field(description="standard deviation of the Gaussian noise (the model's training noise)")
    samples: int = Field(description="forward passes spent on this image: n0 (selection) + samples (estimation)")
    alpha: float
    seed: int = Field(description="noise seed of this image (the request's seed + its index)")


class CertifyTiming(BaseModel):
    queue: float = Field(description="ms waiting for the certify lane")
    compute: float = Field(description="ms of forward passes")
    paused: float = Field(description="ms the lane yielded to queued purification work")
    total: float = Field(description="ms from request start to response")


class CertifyResponse(BaseModel):
    request_id: str
    model: str
    results: list[CertifiedImage]
    timing_ms: CertifyTiming


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code, e.g. bad_image, queue_full")
    detail: str = Field(
        description="what was wrong, in plain language; for options: each option's name, the value sent and the "
        "allowed values"
    )


RESULTS_PAGE = "docs/results.md"
BLIND_ATTACKS = (
    "purifier-blind attacks: adversarial examples computed on the classifier alone, as if there were no purifier "
    "(the paper's FGSM, PGD, CW and DeepFool; this service's demo attack)"
)
ADAPTIVE_ATTACKS = (
    "adaptive attacks that attack purify-then-classify as a whole (BPDA or the full gradient through the purifier, "
    "APGD): accuracy with purification falls to a few percent or less"
)


class RobustnessInfo(BaseModel):
    """What purification does and does not defend against, next to the purification itself (measured: the model
    card and docs/results.md of the source repository)."""

    purifies: bool = Field(description="the model purifies its inputs (false: a baseline served with mode none)")
    resists: str | None = Field(description="what purification resists (None when the model does not purify)")
    does_not_resist: str = Field(description="what it does not resist: the model is not robust against these")
    results: str = Field(description="where the measured accuracies are, in the source repository")
    model_card: str = Field(description="the model's card with its measured accuracies (a URL path on this service)")


class PurifierInfo(BaseModel):
    step_size: float
    steps: int
    budget_step: float
    num_budgets: int
    budgets: list[float]
    max_budget: float


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    queue_depth: int


class CertifyInfo(BaseModel):
    """How mode=certify certifies with this model: the model picks σ (its checkpoint's training noise), so a client
    picks σ by picking the model."""

    sigma: float = Field(description="standard deviation of the smoothing noise: the checkpoint's training noise")
    clamp: bool = Field(
        description="the noisy copies are clamped to [0, 1] before the base classifier (as the checkpoint was trained)"
    )
    n0: int = Field(description="noise samples per image that select the top class (before `samples` estimate it)")
    default_samples: int = Field(description="estimation samples per image when a request names none")
    max_samples: int = Field(description="most estimation samples per image a request may ask for")
    default_alpha: float = Field(description="failure probability of each certificate when a request names none")


class ModelInfo(BaseModel):
    name: str
    default: bool
    network: str
    dataset: str
    aux_task: str
    num_classes: int
    class_names: list[str]
    input_shape: list[int]
    device: str
    ready: bool
    aux_head_trained: bool = Field(
        description="training minimised the auxiliary loss; when false, purification is refused (mode none only)"
    )
    modes: list[Mode | Literal["certify"]] = Field(
        description="modes this model serves: the purification modes, and certify when it records its training noise"
    )
    default_mode: Mode = Field(description="the mode of a request that names none")
    purifier: PurifierInfo
    certify: CertifyInfo | None = Field(
        description="mode=certify's σ and sample limits; null: the model cannot certify"
    )
    robustness: RobustnessInfo = Field(description="which attacks purification resists and which it does not")
    calibration: dict[str, Any] | None = Field(
        description="clean-data auxiliary-loss quantiles and the suspicious threshold, if the checkpoint has them"
    )
    metrics: dict[str, float]
    training: dict[str, Any]
    batching: BatchingInfo


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class Health(BaseModel):
    status: str
    detail: str | None = None


def query_parameters(options: type[BaseModel]) -> list[dict[str, Any]]:
    """An options model's fields as OpenAPI query parameters: JSON schemas inlined (a `$defs` reference would dangle
    in the OpenAPI document) and without the `null` branch of optional fields (a query parameter is absent, never
    null)."""
    schema = options.model_json_schema()
    defs = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    parameters = []
    for name, field in options.model_fields.items():
        prop = {k: v for k, v in inline(schema["properties"][name]).items() if k not in ("description", "title")}
        if "anyOf" in prop:
            branches = [b for b in prop.pop("anyOf") if b != {"type": "null"}]
            prop |= branches[0] if len(branches) == 1 else {"anyOf": branches}
        if prop.get("default", ...) is None:
            del prop["default"]
        parameters.append(
            {"name": name, "in": "query", "required": False, "description": field.description, "schema": prop}
        )
    return parameters


def image_upload_body(max_files: int | None, options: type[BaseModel], *, json_images: bool = False) -> dict[str, Any]:
    """The OpenAPI request body of a route taking images: multipart `file` parts (required) with the options as
    text fields, a raw `image/*` body, and optionally JSON `{"images": [base64, ...], ...options}`."""
    part: dict[str, Any] = {"type": "string", "format": "binary"}
    files = part if max_files == 1 else {"type": "array", "minItems": 1, "items": part}
    fields = {p["name"]: p["schema"] for p in query_parameters(options)}

    def body(required: str, images: dict[str, Any]) -> dict[str, Any]:
        properties = {required: images, **fields}
        return {"type": "object", "required": [required], "properties": properties, "additionalProperties": False}

    content: dict[str, Any] = {"multipart/form-data": {"schema": body("file", files)}, "image/*": {"schema": part}}
    if json_images:
        base64_images = {"type": "array", "minItems": 1, "items": {"type": "string", "format": "byte"}}
        content["application/json"] = {"schema": body("images", base64_images)}
    return {"required": True, "content": content}
