"""Which labeling configs headstart serves, parsed by the SDK's LabelInterface."""

from __future__ import annotations

import pytest

from backend.common.errors import UnsupportedLabelConfig
from backend.labelstudio.labeling_config import choices_in, parse_label_config

TWO_CONTROLS = ('<View><Image name="photo" value="$img"/>'
                '<Choices name="species" toName="photo"><Choice value="ant"/><Choice value="bee"/></Choices>'
                '<Choices name="tags" toName="photo" choice="multiple"><Choice value="blurry"/><Choice value="dark"/>'
                '<Choice value="close-up"/></Choices></View>')


def test_every_choices_on_an_image_gets_a_head():
    species, tags = parse_label_config(TWO_CONTROLS)
    assert (species.control, species.to_name, species.data_key) == ("species", "photo", "img")
    assert species.classes == ("ant", "bee") and not species.multi_label
    assert tags.classes == ("blurry", "dark", "close-up") and tags.multi_label


def test_results_are_in_label_studio_format():
    species, _ = parse_label_config(TWO_CONTROLS)
    assert species.result(["bee"]) == {"from_name": "species", "to_name": "photo", "type": "choices",
                                       "value": {"choices": ["bee"]}}


@pytest.mark.parametrize("config", [
    "",
    "<View",
    '<View><Audio name="a" value="$a"/><Choices name="c" toName="a"><Choice value="a"/></Choices></View>',
    '<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="a"/></RectangleLabels></View>',
    '<View><Text name="t" value="$t"/><Labels name="l" toName="t"><Label value="a"/></Labels></View>',
])
def test_configs_without_image_or_text_choices_are_refused_with_an_example(config):
    with pytest.raises(UnsupportedLabelConfig) as refused:
        parse_label_config(config)
    message = str(refused.value)
    assert "a <Choices> control whose toName is an <Image>, a <Text> or a <HyperText>" in message
    assert '<Text name="text" value="$text"/>' in message and '<Image name="image"' in message


def test_text_and_hypertext_controls_say_which_encoder_and_whether_the_value_is_the_text():
    config = ('<View><Text name="t" value="$body"/><Choices name="topic" toName="t" choice="multiple">'
              '<Choice value="a"/><Choice value="b"/></Choices>'
              '<Text name="u" value="$link" valueType="url"/><Choices name="by_url" toName="u">'
              '<Choice value="a"/><Choice value="b"/></Choices>'
              '<HyperText name="h" value="$html"/><Choices name="page" toName="h"><Choice value="x"/>'
              '<Choice value="y"/></Choices>'
              '<Image name="i" value="$img"/><Choices name="photo" toName="i"><Choice value="p"/></Choices></View>')
    topic, by_url, page, photo = parse_label_config(config)
    assert (topic.modality, topic.markup, topic.inline, topic.data_key, topic.multi_label) == \
        ("text", "", True, "body", True)
    assert (by_url.modality, by_url.inline, by_url.data_key) == ("text", False, "link")
    assert (page.modality, page.markup, page.inline, page.to_name) == ("text", "html", True, "h")
    assert (photo.modality, photo.inline) == ("image", False)


def test_choices_are_read_from_the_matching_control_only():
    species, tags = parse_label_config(TWO_CONTROLS)
    result = [{"from_name": "tags", "value": {"choices": ["dark", "blurry"]}},
              {"from_name": "species", "value": {"choices": ["ant"]}}]
    assert choices_in(result, species) == ["ant"]
    assert choices_in(result, tags) == ["dark", "blurry"]
    assert choices_in([{"from_name": "species", "value": {}}], species) is None
