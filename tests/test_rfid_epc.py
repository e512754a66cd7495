"""EPC decoding against GS1 EPC Tag Data Standard vectors, plus encode/decode round trips (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.rfid import epc as epc_mod
from edge_agent.rfid.epc import DecodedEpc, EpcError, decode_epc, encode_sgtin96, gtin_check_digit

# TDS worked examples (Annex E): SGTIN-96 urn:epc:tag:sgtin-96:3.0614141.812345.6789 and SGTIN-198
# urn:epc:tag:sgtin-198:3.0614141.712345.32a%2Fb (the TDS text prints the pure identity with '8' instead of '7'
# in that one place, a known erratum; the binary and GS1 element string (01)70614141123451(21)32a/b agree on '7').
SGTIN96_HEX = "3074257BF7194E4000001A85"
SGTIN198_HEX = "3674257BF6B7A659B2C2BF1000000000000000000000000000"  # 200 bits as printed in the TDS
SSCC96_HEX = "3174257BF4499602D2000000"  # urn:epc:tag:sscc-96:3.0614141.1234567890


def test_sgtin96_tds_vector() -> None:
    d = decode_epc(SGTIN96_HEX)
    assert d == DecodedEpc("sgtin-96", "80614141123458", "6789", "urn:epc:id:sgtin:0614141.812345.6789")


def test_sgtin198_tds_vector() -> None:
    d = decode_epc(SGTIN198_HEX)
    assert d == DecodedEpc("sgtin-198", "70614141123451", "32a/b", "urn:epc:id:sgtin:0614141.712345.32a%2Fb")


def test_sgtin198_as_read_from_a_tag_in_16_bit_words() -> None:
    # A reader returns the EPC bank in words: 198 bits -> 13 words = 208 bits, zero-padded.
    assert decode_epc(SGTIN198_HEX + "00") == decode_epc(SGTIN198_HEX)


def test_lower_case_is_accepted() -> None:
    assert decode_epc(SGTIN96_HEX.lower()) == decode_epc(SGTIN96_HEX)


def test_other_gs1_scheme_is_raw_with_its_uri() -> None:
    d = decode_epc(SSCC96_HEX)
    assert d.scheme == "raw" and d.gtin is None and d.serial is None
    assert d.uri == "urn:epc:id:sscc:0614141.1234567890"


@pytest.mark.parametrize("h", ["E28011606000020520A0614E", "E2801191A5030065F26CCBFF", "0000000000000000", "8A450224"])
def test_non_gs1_tags_are_raw(h: str) -> None:
    assert decode_epc(h) == DecodedEpc("raw", None, None, None)


def _bits_to_hex(bits: str) -> str:
    bits += "0" * (-len(bits) % 16)
    return format(int(bits, 2), f"0{len(bits) // 4}X")


def _sgtin96_bits() -> str:
    return format(int(SGTIN96_HEX, 16), "096b")


@pytest.mark.parametrize(
    ("h", "reason"),
    [
        ("", "empty"),
        ("30 74257BF7194E4000001A85", "not hex"),
        ("0x3074257BF7194E4000001A85", "not hex"),
        ("3074257BF7194E4000001A8", "odd length"),
        ("ABCDEF", "shorter than 32 bits"),
        ("AB" * 63, "longer than 496 bits"),
        ("3000000000000000", "only 64 bits"),
        (SGTIN96_HEX + "00FF", "non-zero bits past bit 96"),
        (SGTIN198_HEX[:48], "only 192 bits"),
    ],
)
def test_malformed_input_raises_with_reason(h: str, reason: str) -> None:
    with pytest.raises(EpcError, match=reason):
        decode_epc(h)


def test_corrupt_sgtin_content_raises() -> None:
    b = _sgtin96_bits()
    partition7 = _bits_to_hex(b[:11] + "111" + b[14:])
    item_ref_overflow = _bits_to_hex(b[:38] + "1" * 20 + b[58:])  # 20 bits of ones > 6 digits
    for h in (partition7, item_ref_overflow):
        with pytest.raises(EpcError, match="invalid sgtin-96"):
            decode_epc(h)
    # SGTIN-198 with a serial character after the zero terminator: not a valid TDS string encoding.
    b198 = format(int(SGTIN198_HEX, 16), "0200b")[:198]
    serial = b198[58:]
    chars = [serial[i : i + 7] for i in range(0, 140, 7)]
    chars[7] = format(ord("Z"), "07b")  # "32a/b" is 5 chars; char 5 is the terminator
    with pytest.raises(EpcError, match="canonical"):
        decode_epc(_bits_to_hex(b198[:58] + "".join(chars)))


def test_epc_error_is_a_value_error_and_non_str_input_is_malformed() -> None:
    assert issubclass(EpcError, ValueError)
    for bad in (None, 42, b"3074257BF7194E4000001A85", ["30"]):
        with pytest.raises(EpcError, match="must be a hex str"):
            decode_epc(bad)  # type: ignore[arg-type]


def test_decoding_is_memoised() -> None:
    epc_mod.cache_clear()
    first = decode_epc(SGTIN96_HEX)
    again = decode_epc(SGTIN96_HEX)
    assert again is first
    info = epc_mod.cache_info()
    assert info.hits >= 1 and info.misses == 1 and info.maxsize == epc_mod.CACHE_SIZE >= 100_000


def test_encode_tds_vector() -> None:
    assert encode_sgtin96("80614141123458", 6789, filter_value=3, company_prefix_digits=7) == SGTIN96_HEX


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("80614141123459", 1), "check digit"),
        (("8061414112345", 1), "14 digits"),
        (("8061414112345X", 1), "14 digits"),
        (("80614141123458", -1), "serial"),
        (("80614141123458", 1 << 38), "serial"),
        (("80614141123458", True), "serial"),
        (("80614141123458", 1, 8), "filter"),
        (("80614141123458", 1, 1, 5), "company prefix"),
        (("80614141123458", 1, 1, 13), "company prefix"),
    ],
)
def test_encode_rejects_bad_arguments(args: tuple, reason: str) -> None:
    with pytest.raises(EpcError, match=reason):
        encode_sgtin96(*args)


@st.composite
def gtin14s(draw: st.DrawFn) -> str:
    first13 = draw(st.text("0123456789", min_size=13, max_size=13))
    return first13 + gtin_check_digit(first13)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gtin=gtin14s(),
    serial=st.integers(0, (1 << 38) - 1),
    filter_value=st.integers(0, 7),
    cp_digits=st.integers(6, 12),
)
def test_encode_decode_round_trip(gtin: str, serial: int, filter_value: int, cp_digits: int) -> None:
    h = encode_sgtin96(gtin, serial, filter_value, cp_digits)
    assert len(h) == 24 and h == h.upper() and h.startswith("3")
    assert int(h[2], 16) >> 1 == filter_value
    d = decode_epc(h)
    assert (d.scheme, d.gtin, d.serial) == ("sgtin-96", gtin, str(serial))
    assert d.uri == f"urn:epc:id:sgtin:{gtin[1 : 1 + cp_digits]}.{gtin[0]}{gtin[1 + cp_digits : 13]}.{serial}"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=140), st.text("0123456789abcdefABCDEF", max_size=140)))
def test_decode_only_ever_raises_epc_error(text: str) -> None:
    try:
        d = decode_epc(text)
    except EpcError as exc:
        assert str(exc)
    else:
        assert d.scheme in ("sgtin-96", "sgtin-198", "raw")
        assert (d.gtin is None) == (d.scheme == "raw")


@settings(max_examples=200, deadline=None)
@given(header=st.sampled_from(["30", "36", "31", "E2"]), body=st.binary(min_size=11, max_size=31))
def test_random_bits_under_sgtin_headers_decode_or_raise_cleanly(header: str, body: bytes) -> None:
    h = header + body.hex().upper()
    try:
        d = decode_epc(h)
    except EpcError:
        assert header in ("30", "36")  # only a GS1 SGTIN header can make well-formed hex "malformed"
    else:
        if d.scheme != "raw":
            assert d.gtin is not None and len(d.gtin) == 14 and d.gtin.isdigit()
            assert d.gtin[13] == gtin_check_digit(d.gtin[:13])
