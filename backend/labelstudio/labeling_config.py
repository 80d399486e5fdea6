"""What headstart can serve in a Label Studio labeling config: `Choices` bound to an `Image`, a `Text`
or a `HyperText`.

Parsing is the SDK's `LabelInterface`; this module only picks out the controls headstart trains
a head for and builds prediction results in Label Studio's format.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import ChoicesTag
from label_studio_sdk.label_interface.object_tags import HyperTextTag, ImageTag, TextTag

from backend.common.errors import UnsupportedLabelConfig

SUPPORTED = (
    'headstart serves image and text classification: a <Choices> control whose toName is an <Image>, '
    'a <Text> or a <HyperText> (tags stripped), e.g. <View><Image name="image" value="$image"/>'
    '<Choices name="label" toName="image"><Choice value="Cat"/><Choice value="Dog"/></Choices></View> '
    'or <View><Text name="text" value="$text"/><Choices name="topic" toName="text">'
    '<Choice value="Sport"/><Choice value="Tech"/></Choices></View>. Add choice="multiple" for '
    'multi-label; several controls (also on different objects) each get their own head.'
)
# object tag → (modality, markup) of the encoder its input needs
OBJECTS = ((ImageTag, "image", ""), (HyperTextTag, "text", "html"), (TextTag, "text", ""))

PARSED_CONFIGS_KEPT = 256
LARGEST_CACHED_CONFIG = 64 * 1024  # characters; real labeling configs are a few KB


@dataclass(frozen=True)
class HeadSpec:
    """One `Choices` control on one object (`Image`, `Text`, `HyperText`): a head is trained for each."""

    control: str
    to_name: str
    data_key: str
    classes: tuple[str, ...]
    multi_label: bool
    modality: str = "image"  # which encoder: "image" or "text"
    markup: str = ""  # "html" for <HyperText>: the visible text is embedded
    inline: bool = False  # the task's value is the text itself (not a URL to fetch it from)
    # per class, the backbone classes a `<Choice predicted_values="ant,bee">` names (empty: none named)
    predicted_values: tuple[tuple[str, ...], ...] = ()

    def result(self, choices: list[str]) -> dict:
        return {"from_name": self.control, "to_name": self.to_name, "type": "choices",
                "value": {"choices": list(choices)}}


def parse_label_config(config: str) -> list[HeadSpec]:
    """Every servable control of `config`, in document order. Raises if there is none."""
    if not isinstance(config, str) or not config.strip():
        raise UnsupportedLabelConfig(f"The labeling config is empty. {SUPPORTED}")
    if len(config) > LARGEST_CACHED_CONFIG:  # keep the cache small whatever clients send
        return list(_parse.__wrapped__(config))
    return list(_parse(config))


@functools.lru_cache(maxsize=PARSED_CONFIGS_KEPT)
def _parse(config: str) -> tuple[HeadSpec, ...]:
    """Label Studio sends the same config with every request: parse each one once per process."""
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises assorted XML and validation errors
        raise UnsupportedLabelConfig(f"The labeling config cannot be parsed ({exc}). {SUPPORTED}") from None
    specs = []
    for control in interface.controls:
        if not isinstance(control, ChoicesTag):
            continue
        bound = [(obj, modality, markup) for obj in control.objects
                 for tag, modality, markup in OBJECTS if isinstance(obj, tag)]
        if not bound or not control.labels:
            continue
        obj, modality, markup = bound[0]
        value = obj.value or ""
        if not value.startswith("$") or len(value) < 2:
            continue
        value_type = str(obj.attr.get("valueType") or obj.attr.get("valuetype") or "text").lower()
        specs.append(HeadSpec(
            control=control.name,
            to_name=obj.name,
            data_key=value[1:],
            classes=tuple(control.labels),
            multi_label=str(control.attr.get("choice", "single")).lower() == "multiple",
            modality=modality,
            markup=markup,
            inline=modality == "text" and value_type != "url",
            predicted_values=_predicted_values(control),
        ))
    if not specs:
        raise UnsupportedLabelConfig(f"Nothing in this labeling config can be served. {SUPPORTED}")
    return tuple(specs)


def _predicted_values(control: ChoicesTag) -> tuple[tuple[str, ...], ...]:
    """Each choice's `predicted_values="jeep,cab"` (the convention of Label Studio's YOLO backend) as names."""
    attrs = control.labels_attrs or {}
    named = []
    for label in control.labels:
        tag = attrs.get(label)
        raw = str((tag.attr if tag is not None else {}).get("predicted_values") or "")
        named.append(tuple(name.strip() for name in raw.split(",") if name.strip()))
    return tuple(named) if any(named) else ()


def choices_in(result: list, spec: HeadSpec) -> list[str] | None:
    """The choices an annotation's `result` makes for `spec`'s control, or None if it makes none."""
    for region in result or []:
        if not isinstance(region, dict) or region.get("from_name") != spec.control:
            continue
        value = region.get("value")
        choices = value.get("choices") if isinstance(value, dict) else None
        if isinstance(choices, list) and choices:
            return [str(choice) for choice in choices]
    return None
