import pytest

from autopull.connectors.errors import PermanentError
from autopull.connectors.mail.base import required_message_id


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<abc@example.net>", "abc@example.net"),
        ("  < abc@example.net >\r\n", "abc@example.net"),
        ("abc@example.net", "abc@example.net"),
        ("<[gw10].x@[gw13].example.com>", "[gw10].x@[gw13].example.com"),
    ],
)
def test_required_message_id_strips_brackets(value, expected):
    assert required_message_id(value, "graph") == expected


@pytest.mark.parametrize("value", ["", "   ", "<>", " < > "])
def test_required_message_id_empty_raises(value):
    with pytest.raises(PermanentError, match="is empty") as caught:
        required_message_id(value, "ews")
    assert caught.value.platform == "ews"
