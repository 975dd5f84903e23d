"""Random identifiers, against the standard library's `uuid.UUID`."""

from __future__ import annotations

import uuid

from wire.ids import uuid4_hex, uuid4_text


def test_identifiers_are_version_4_uuids_as_the_standard_library_writes_them() -> None:
    texts = {uuid4_text() for _ in range(2000)}
    hexes = {uuid4_hex() for _ in range(2000)}
    assert len(texts) == len(hexes) == 2000
    for text in texts:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == text
    for value in hexes:
        parsed = uuid.UUID(hex=value)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert parsed.hex == value


def test_the_random_bits_vary_everywhere_but_in_the_version_and_variant() -> None:
    values = [uuid.UUID(hex=uuid4_hex()).int for _ in range(4000)]
    fixed = (0xF << 76) | (0x3 << 62)  # the version nibble and the variant's two bits
    varying = 0
    for value in values[1:]:
        varying |= value ^ values[0]
    assert varying == ((1 << 128) - 1) & ~fixed
