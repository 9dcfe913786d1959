"""Label Studio's ML-backend protocol: read a project's labelling config, turn detections into `rectanglelabels`.

The config is XML from the client: it is parsed only when small (MAX_CONFIG_CHARS), with defusedxml when installed,
and a document declaring a DTD or entities is refused either way (no entity expansion, no external fetches).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ovdet.service.settings import ServiceError

__all__ = ["LabelConfig", "MAX_CONFIG_CHARS", "MAX_TASKS", "failed_task", "parse_label_config", "task_results"]

MAX_CONFIG_CHARS = 256 * 1024
# Label Studio sends every selected task in one /predict ("Retrieve predictions" on a whole project) and stores
# nothing when the answer is an error, so the cap is per Label Studio request, well above --max-images; the tasks
# are read and detected one at a time. Label Studio waits ML_TIMEOUT_PREDICT (100 s by default) for the answer.
MAX_TASKS = 1000
_DTD = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)

try:  # the hardened parser, when installed; the checks below stand on their own without it
    from defusedxml.ElementTree import fromstring as _fromstring
except ImportError:  # pragma: no cover - depends on the environment
    from xml.etree.ElementTree import fromstring as _fromstring  # noqa: S405 (size-capped, DTD refused above)


@dataclass(frozen=True)
class LabelConfig:
    """The parts of a labelling config ovdet fills: the RectangleLabels control (`from_name`), the Image it labels
    (`to_name`), the task data key holding the image (`data_key`, from value="$image") and the labels."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]


def parse_label_config(xml: Any) -> LabelConfig:
    """The first <RectangleLabels> of `xml` with its <Label value=...> children; ServiceError 400 when the config is
    not a string, too big, declares a DTD, is not XML, or has no RectangleLabels with labels on an Image."""
    if not isinstance(xml, str) or not xml.strip():
        raise ServiceError(400, "bad_label_config", "the labelling config must be a non-empty XML string")
    if len(xml) > MAX_CONFIG_CHARS:
        raise ServiceError(413, "label_config_too_large",
                           f"the labelling config is {len(xml):,} characters, more than {MAX_CONFIG_CHARS:,}")
    if _DTD.search(xml):
        raise ServiceError(400, "bad_label_config", "the labelling config declares a DTD or entities, which ovdet "
                           "does not read; remove the <!DOCTYPE>/<!ENTITY> part")
    try:
        root = _fromstring(xml)
    except Exception as exc:  # ParseError, or defusedxml's refusals
        raise ServiceError(400, "bad_label_config", f"the labelling config is not well-formed XML ({exc})") from None
    images = {el.get("name"): el.get("value", "") for el in root.iter() if el.tag == "Image"}
    for control in root.iter("RectangleLabels"):
        labels = tuple(dict.fromkeys(v for el in control.iter("Label") if (v := (el.get("value") or "").strip())))
        to_name = control.get("toName", "")
        if labels and to_name in images and control.get("name"):
            value = images[to_name]
            return LabelConfig(control.get("name"), to_name, value[1:] if value.startswith("$") else value, labels)
    raise ServiceError(400, "no_rectangle_labels", "the labelling config has no <RectangleLabels> with <Label "
                       "value=...> children on an <Image>; ovdet pre-annotates boxes only")


def failed_task(error: dict[str, Any], model_version: str) -> dict[str, Any]:
    """The answer for a task that could not be predicted (its image unreadable, outside --data-root, ...): the error
    and no `result` key. Label Studio 1.23 skips an answer without `result` and stores no prediction, so the task is
    asked for again next time; an empty result would be stored as "the model found nothing" and never retried."""
    return {"model_version": model_version, "error": error}


def task_results(dets: Any, width: int, height: int, config: LabelConfig, model_version: str) -> dict[str, Any]:
    """One task's prediction: a `rectanglelabels` result per box in percent of the image, its score, the mean score
    of the task and the model version."""
    results = []
    for (x1, y1, x2, y2), score, name in zip(dets.xyxy.tolist(), dets.confidence.tolist(), dets.data["class_name"]):
        results.append({
            "from_name": config.from_name, "to_name": config.to_name, "type": "rectanglelabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100.0 * x1 / width, "y": 100.0 * y1 / height, "width": 100.0 * (x2 - x1) / width,
                      "height": 100.0 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": [str(name)]},
            "score": float(score)})
    mean = sum(r["score"] for r in results) / len(results) if results else 0.0
    return {"result": results, "score": mean, "model_version": model_version}
