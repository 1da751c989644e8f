"""Untrusted text on a Streamlit page. Method names, parameters, notes and errors come from the
store (anyone's plugin or results file): they are shown through text and dataframe elements, and
where an element renders markdown (errors, labels, headers) through `plain`, which escapes every
ASCII punctuation character (CommonMark's backslash escapes), so nothing in them is markup."""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")


def plain(text: object) -> str:
    """`text` as markdown source that renders as exactly that text."""
    return _PUNCTUATION.sub(r"\\\1", str(text)).replace("\n", " ")
