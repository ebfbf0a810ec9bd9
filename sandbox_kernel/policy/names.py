"""Domain names in egress entries: validation, IDNA encoding and homoglyph checks.

Called by :func:`sandbox_kernel.policy.model.parse_entry` for every domain and wildcard
entry. The result is always the lowercase ASCII (punycode) form, which is what DNS,
nftables comments, Kubernetes objects and the agent's guard all compare against.

Unicode names are accepted when they are ordinary internationalized names (``bücher.de``
becomes ``xn--bcher-kva.de``) and refused when they look built to impersonate another
name: a label that mixes scripts (a Cyrillic ``а`` inside ``pаypal``), or a label written
entirely in Cyrillic/Greek/Armenian letters that all look Latin (``аррӏе``) under an
ASCII top-level domain. Punycode given directly (``xn--pypal-4ve.com``) is decoded and
checked the same way, so writing the A-label is no way around the check.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import idna

MAX_LABEL = 63
MAX_NAME = 253

_LDH = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

# Letters of other scripts that render like Latin letters. A label made only of these
# (plus digits and hyphens) is a whole-script spoof of an ASCII name.
_LATIN_LOOKALIKES = frozenset(
    "аеорсухѕіјһԁԛԝӏ"  # Cyrillic: a e o p c y x s i j h d q w l
    "οανικρυχ"  # Greek: o a v i k p u x
    "օսհոց"  # Armenian: o u h n g
)

# Scripts that legitimately combine inside one label (UTS #39 "highly restrictive").
_COMBINABLE = (
    frozenset({"HAN", "HIRAGANA", "KATAKANA"}),
    frozenset({"HAN", "BOPOMOFO"}),
    frozenset({"HAN", "HANGUL"}),
)


class NameRejected(ValueError):
    """A domain name is not acceptable; ``str(err)`` is the reason. Wrapped by model.py."""


def normalize_domain(text: str) -> str:
    """Return ``text`` as a lowercase ASCII domain name, or raise :class:`NameRejected`.

    ``text`` has no wildcard, no port and no surrounding whitespace (model.py strips
    those). One trailing dot (the DNS root) is accepted and removed.
    """
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise NameRejected("the domain name is empty")
    if text.isascii():
        ascii_name = text.lower()
        for label in ascii_name.split("."):
            _check_ascii_label(label)
            if label.startswith("xn--"):
                _check_unicode_label(_decode_alabel(label), ascii_name)
    else:
        ascii_name = _encode_unicode(text)
    _check_name_shape(ascii_name)
    return ascii_name


@functools.lru_cache(maxsize=1)
def _public_suffix_list():
    # the Public Suffix List as the publicsuffixlist package ships it (ICANN and private
    # sections: *.co.uk as well as *.github.io); loaded on the first wildcard, ~0.2 s
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def is_public_suffix(ascii_name: str) -> bool:
    """Whether a wildcard directly under ``ascii_name`` would span a whole public suffix
    (``*.co.uk``, ``*.github.io``): any single label, and every name on the Public Suffix List."""
    return "." not in ascii_name or bool(_public_suffix_list().is_public(ascii_name))


def _check_ascii_label(label: str) -> None:
    if not label:
        raise NameRejected("the name has an empty label (two dots in a row, or a leading dot)")
    if len(label) > MAX_LABEL:
        raise NameRejected(
            f"label {label[:20]!r}… is {len(label)} characters long; DNS allows at most {MAX_LABEL}"
        )
    if not _LDH.match(label):
        if label.startswith("-") or label.endswith("-"):
            raise NameRejected(f"label {label!r} starts or ends with '-'")
        bad = next(ch for ch in label if not (ch.isalnum() and ch.isascii()) and ch != "-")
        raise NameRejected(
            f"label {label!r} contains {bad!r}; only letters, digits and '-' are allowed"
        )


def _check_name_shape(ascii_name: str) -> None:
    if len(ascii_name) > MAX_NAME:
        raise NameRejected(
            f"the name is {len(ascii_name)} characters long; DNS allows at most {MAX_NAME}"
        )
    labels = ascii_name.split(".")
    if len(labels) < 2:
        raise NameRejected(
            f"{ascii_name!r} is a single label, not a fully qualified domain name; "
            "write the full name (e.g. host.example.com)"
        )
    if labels[-1].isdigit():
        # "1.2.3.400" is a mistyped address, not a name: say so rather than accept it.
        raise NameRejected(f"the top-level label {labels[-1]!r} is numeric; is this an IP address?")


def _decode_alabel(label: str) -> str:
    try:
        return idna.decode(label)
    except (idna.IDNAError, UnicodeError) as err:
        raise NameRejected(f"label {label!r} is not valid punycode: {err}") from None


def _encode_unicode(text: str) -> str:
    try:
        # UTS #46 mapping: case folding, full-width dots and letters, as browsers do.
        mapped = idna.uts46_remap(text, std3_rules=True, transitional=False)
    except (idna.IDNAError, UnicodeError) as err:
        raise NameRejected(f"not a valid internationalized domain name: {err}") from None
    labels = mapped.split(".")
    ascii_labels = []
    for label in labels:
        if not label:
            raise NameRejected("the name has an empty label (two dots in a row, or a leading dot)")
        try:
            ascii_label = idna.alabel(label).decode("ascii")
        except (idna.IDNAError, UnicodeError) as err:
            raise NameRejected(f"label {label!r} is not a valid internationalized label: {err}") from None
        _check_ascii_label(ascii_label)
        ascii_labels.append(ascii_label)
    ascii_name = ".".join(ascii_labels)
    for label in labels:
        _check_unicode_label(label, ascii_name)
    return ascii_name


def _check_unicode_label(label: str, ascii_name: str) -> None:
    scripts = {s for s in map(_script_of, label) if s is not None}
    if len(scripts) > 1 and not _may_combine(scripts):
        names = " and ".join(sorted(s.title() for s in scripts))
        raise NameRejected(
            f"label {label!r} mixes {names} letters, a common way to imitate another name "
            "(homoglyph); write the name in one script"
        )
    tld_is_ascii = not ascii_name.rsplit(".", 1)[-1].startswith("xn--")
    letters = [ch for ch in label if ch not in "-0123456789"]
    if tld_is_ascii and letters and all(ch in _LATIN_LOOKALIKES for ch in letters):
        raise NameRejected(
            f"every letter of {label!r} looks like a Latin letter but is not "
            "(whole-script homoglyph); if you meant the ASCII name, type it in ASCII"
        )


def _may_combine(scripts: set[str]) -> bool:
    rest = scripts - {"LATIN"}
    return any(rest <= allowed for allowed in _COMBINABLE)


def _script_of(ch: str) -> str | None:
    """The script of one character, from its Unicode name; None for digits, '-', marks."""
    if ch.isascii():
        return "LATIN" if ch.isalpha() else None
    if unicodedata.category(ch).startswith("M"):
        return None  # combining marks inherit the script of the letter they follow
    name = unicodedata.name(ch, "")
    if name.startswith("CJK ") or name.startswith("IDEOGRAPHIC"):
        return "HAN"
    if name.startswith("KATAKANA-HIRAGANA"):
        return None  # the prolonged sound mark is shared by both kana
    if unicodedata.category(ch) == "Nd":
        return None
    return name.split(" ", 1)[0] or None
