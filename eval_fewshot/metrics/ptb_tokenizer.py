"""Pure-Python caption tokenizer giving the tokens of pycocoevalcap's PTB tokenizer.

pycocoevalcap scores captions after running the Java ``PTBTokenizer`` of Stanford CoreNLP 3.4.1
(``-preserveLines -lowerCase``) over them, one caption per line. :func:`ptb_tokenize_lines`
produces the same tokens without Java. It is our own rule set, derived from and checked against
that program's output (``tests/test_eval_metrics.py`` compares the two on thousands of
captions whenever ``java`` is installed). A longest-match lexer over an ordered rule table
(:data:`RULES`; on equal length the earlier rule wins) covers what captions contain:

* words, lower-cased; hyphens, underscores and dots inside words (``t-shirt``, ``x.jpg``,
  ``www.x.com``); up to three slash-joined parts (``dog/cat``, ``red/blue/green / white``);
* periods: split off a word (``street .``) except on abbreviations and acronyms, which keep
  theirs (``mr.``, ``st.``, ``etc.``, ``u.s.``, ``a.m.``, ``ph.d.``, a single letter; ``no.``
  and ``fig.`` only before a number). The abbreviations are the words the Java tokenizer keeps,
  found by running it on every letter string of up to four letters (five when capitalised).
  A single letter loses its period before a sentence opener (``A.`` then ``The`` or ``It``),
  even on the next line, which is why captions are tokenised as a batch;
* clitics and contractions: ``dog 's``, ``do n't``, ``they 're``, ``can not``, ``gon na``,
  ``wan na``, ``got ta``, ``lem me``, ``gim me``, ``'t is``; ``o'clock``, ``'90s``, ``'em``
  stay whole;
* numbers (``3.5``, ``1,000``, ``12:30``, ``-5``), ``3 1/2`` joined by a no-break space,
  ``½`` -> ``1/2``, currency signs (``$``, ``£`` -> ``#``, ``€`` -> ``$``), ``%``;
* quotes: ``"`` is an opening quote (two backquotes) before an ASCII letter, digit or ``$``
  and a closing one (two apostrophes) elsewhere; ``'`` is opening (a backquote) before an
  ASCII letter that is not followed by a space or the end; curly quotes by their direction;
* brackets as ``-lrb-``/``-rrb-``, ``-lsb-``/``-rsb-``, ``-lcb-``/``-rcb-``; dashes ``--``
  (also ``---``, ``–``, ``—``); ellipses ``...`` (also ``. . .``, ``…``); runs of ``!``/``?``.

Line breaks inside a caption (``\\r``, vertical tab, form feed, U+2028/U+2029) are spaces; the
Java tool would start a new line there, which in pycocoevalcap shifts every later caption.

Where it may still differ from the Java tool, on text that captions do not contain (measured by
``python -m benchmarks.ptb_tokenizer --characters``): letter classes come from Python's Unicode
tables, not the older ones of the Java lexer, so letters of recently encoded scripts, symbols
and combining marks outside Latin can be split, joined or dropped differently (characters above
U+FFFF are dropped, as Java does); URLs, e-mail addresses, SGML/HTML tags and entities,
emoticons and unusual apostrophe words are matched in their common forms only; words run
together with other tokens without a space (``U.S.can't``, ``'single'a@b.com``) may split
differently. It does not emit the extra ``.`` the Java tool adds after an abbreviation that
ends a sentence; pycocoevalcap removes ``.`` tokens, so scores are the same.
``--caption-tokenizer java`` runs the Java tokenizer itself and is exact.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence

# -- character classes ---------------------------------------------------------------------------
# Word characters: letters, digits and combining marks of the Basic Multilingual Plane, without
# superscript/subscript digits and vulgar fractions (split off as tokens of their own).
_NOT_WORD = "\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\U00010000-\U0010ffff"
A = rf"[^\W_{_NOT_WORD}]"  # a word character
L = rf"[^\W\d_{_NOT_WORD}]"  # a letter
AZ = "[A-Za-z]"
APOS = "['\u2019]"  # an apostrophe, ASCII or typographic
SPACE = "[ \t\u00a0\u1680\u2000-\u200b\u202f\u205f\u3000\ufeff\x1c-\x1f\x85]"
NOT_WORD_AFTER = rf"(?!{A})"
D = r"[^\D\U00010000-\U0010ffff]"  # a digit
# Characters the Java tool treats as line ends: inside a caption they are spaces.
LINE_BREAKS = str.maketrans(dict.fromkeys("\n\r\x0b\x0c\u2028\u2029", " "))

# -- abbreviations that keep their period --------------------------------------------------------
# The Java tokenizer's own list as its output shows it: every letter string of length 1-4 in
# lower, capitalised and upper case ("q WORD. z"), every capitalised 5-letter string and a list
# of longer candidates. In each entry a lower-case letter matches either case, an upper-case
# letter only itself, and a letter after "!" only its lower case.
ABBREVIATIONS = (
    # titles, ranks, forms of address
    "adj adm adv asst atty attys brig capt cmdr col comdr cpl det dr drs ens esq gen gov govs "
    "hon insp jr lieut maj messrs mlle mme mr mrs ms msgr pfc ph pres prof profs pvt rep reps "
    "rev sen sens sfc sgt spc sr supt supts treas "
    # places and addresses
    "al ala alex ariz Ark ave Az bldg blvd calif colo conn ct dak Del fla ft ga Ill ind kan "
    "kans ky La Mass md Miss mich minn mo mont mt neb nev okla Ore Pa penn rd rt sq st ste tenn "
    "Tex va vt Wash wis wisc wyo "
    # months and days
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri "
    # companies and organisations
    "assn assoc bhd bros co corp cos cie dept elec inc intl invt ltd m!fg m!tg natl plc "
    "pt!e pt!es pt!y pt!ys ppt!e ppt!es ppt!y ppt!ys univ "
    # other
    "cf est etc ext jos seq sys tel vs wm"
).split()
# Kept only before a number (at most one space between): "no. 5", "fig. 3a", "pp. 4-5".
NUMBER_ABBREVIATIONS = ("no", "nos", "pp", "op", "ca", "art", "fig", "figs", "prop")
# Words after which a single letter's period is a sentence end ("A. The dog"), found the same
# way (capitalised and upper-case strings of up to five letters, longer candidates); the first
# letter must be upper case, the word followed by a space or the end.
SENTENCE_OPENERS = (
    "A An As At He If In It So We But Her Now One Our She The Yet You Here Last Many More Once "
    "Some Such That Then They This What When About After Other Since Their There These While "
    "Earlier However Additionally Mr. Ms."
).split()
SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3}
FILE_EXTENSIONS = (
    "c h x gz pl ps py bat bmp cgi cpp dll doc exe gif htm jar jpg mov pdf php png ppt sql tar "
    "txt wav xml zip docx html java jpeg mp3"
).split()


def _cased(spec: str) -> str:
    """Regex of one abbreviation entry (see :data:`ABBREVIATIONS` for the case notation)."""
    out, lower = [], False
    for ch in spec:
        if ch == "!":
            lower = True
            continue
        out.append(ch if ch.isupper() or lower or not ch.isalpha() else f"[{ch}{ch.upper()}]")
        lower = False
    return "".join(out)


def _opener(word: str) -> str:
    return word[0] + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c)
                             for c in word[1:])


# -- what tokens become --------------------------------------------------------------------------
TRANSLATE = {
    "(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-",
    "\u00ab": "``", "\u201c": "``", "\u0093": "``", "\u00bb": "''", "\u201d": "''", "\u0094": "''",
    "\u2018": "`", "\u201b": "`", "\u2039": "`", "\u0091": "`", "\u2019": "'", "\u203a": "'",
    "\u0092": "'", "\u2013": "--", "\u2014": "--", "\u2015": "--", "\u0096": "--", "\u0097": "--",
    "\u2026": "...", "\u00ad": "-", "\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u20ac": "$",
    "\u20a0": "$", "\u0080": "$", "\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4",
    "\u2153": "1/3", "\u2154": "2/3",
}
ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": "''", "apos": "'"}
# Characters the Java tokenizer drops: dashes and brackets it has no rule for, C1 controls
# without a meaning above; unassigned, private-use and other control characters by category.
_DROPPED = frozenset("\u2010\u2011\u2012\u2053\u20a9\u20b9\u20bd\u3008\u3009\u300c\u300d"
                     "\u300e\u300f\u3010\u3011")


def _dropped(ch: str) -> bool:
    return (ch in _DROPPED or ord(ch) > 0xFFFF
            or unicodedata.category(ch) in ("Cn", "Co", "Cs", "Cc", "Cf"))


# -- the rule table ------------------------------------------------------------------------------
CLITIC = rf"{APOS}(?:[sSdDmM]|[rR][eE]|[vV][eE]|[lL][lL])(?!{AZ})"
NOT = rf"[nN]{APOS}[tT]{AZ}*"
HYPHENS = "[-_\u00ad\u2010\u2011\u058a]"
WORD = rf"{A}+(?:{HYPHENS}{A}+)*"
DOTTED = rf"{L}{A}*(?:\.{L}{A}*)+(?:[-_]{A}+)*"
SLASH_PART = "[A-Za-z0-9]+(?:[-_][A-Za-z]+)*"
OPENER = "|".join(_opener(w) for w in SENTENCE_OPENERS)
RULE_PATTERNS = [
    ("space", rf"(?:{SPACE}|\n)+"),
    ("split_word", rf"(?i:{'|'.join(SPLIT_WORDS)}){NOT_WORD_AFTER}"),
    ("clitic_word", rf"(?:{DOTTED}|{WORD}){CLITIC}|{A}+{NOT}"),
    ("clitic", rf"{CLITIC}|{NOT}"),
    ("t_is", r"'[tT](?=(?i:is|was))"),
    ("keep", rf"{APOS}(?i:em|til|till|cause)|[cC]'mon"),
    ("keep", rf"(?i:ma'am|ne'er|e'er|o'er|li'l|ol'){AZ}*"),
    ("keep", rf"{APOS}[nN]{APOS}|{APOS}[nN](?!{AZ})"),
    ("keep", rf"{APOS}{D}{D}(?:[sS]|(?![A-Za-z0-9'\"]))"),
    ("keep", rf"(?:[DdLlNnOo]|[A-HJ-XZ]){APOS}{AZ}{{2}}{A}*"),
    ("keep", rf"[DdJjLlYy]{APOS}(?={AZ})"),
    ("word", rf"{DOTTED}|{WORD}"),
    ("word", rf"{SLASH_PART}(?:/{SLASH_PART}){{1,2}}"),
    ("word", rf"{AZ}+(?:[!?]{AZ}+)+"),
    ("keep", rf"(?:{AZ}\.){{2,}}|(?i:ph|ed)\.[dD]\."),
    ("abbreviation", rf"(?:{'|'.join(_cased(a) for a in ABBREVIATIONS)})\."),
    ("keep", rf"(?i:{'|'.join(NUMBER_ABBREVIATIONS)})\.(?=\s?{D})"),
    ("keep", rf"(?:{DOTTED}|{WORD})\.(?=[,;:])"),
    ("keep", rf"{AZ}\.(?!\s+(?:{OPENER})(?:\s|$))"),
    ("keep", rf"[-+.,:]?{D}+(?:[.,:]{D}+)*"),
    ("fraction", rf"{D}+[ \u00a0-]{D}+/{D}+"),
    ("keep", rf"{D}{A}*(?:\.{A}+)*\.(?i:{'|'.join(FILE_EXTENSIONS)}){NOT_WORD_AFTER}"),
    ("keep", r"[A-Z]+(?:[&+][A-Z]+)+s?|[Cc]\+\+|[CcFf]#|[A-Z]{1,3}\$"),
    ("keep", rf"[#@]{L}+|{A}+(?:[._-]{A}+)*@{A}+(?:[.-]{A}+)*"),
    ("keep", r"(?i:https?)://[A-Za-z0-9./?=&_%#:~+-]*[A-Za-z0-9/]"),
    ("sgml", r"</?[A-Za-z][A-Za-z0-9]*(?:[ \t]+[A-Za-z]+=\"[^\"<>\n]*\")*[ \t]*/?>"),
    ("entity", r"&(?i:amp|lt|gt|quot|apos|nbsp);|&#\d+;"),
    ("emoticon", rf"[:;=]{APOS}?-?[()\[\]DdPp](?![A-Za-z0-9])|\^_\^|-_-"),
    ("ellipsis", r"\.{3,5}|\.(?: \.){2,4}|\u2026"),
    ("dashes", r"--+"),
    ("keep", r"[!?]+|#+|\*+|@+|_+|<<|>>|''|``"),
    ("quote", r"[\"'`]"),
    ("char", r"."),
]
RULES = [(name, re.compile(pattern)) for name, pattern in RULE_PATTERNS]
# The common cases, decided without the rule table: white space, a word of ASCII letters
# followed by white space, or by a period and white space (the period is a token of its own
# unless the word is an abbreviation or a split word, which the table decides).
_FAST = re.compile(rf"(?P<space>(?:{SPACE}|\n)+)|[A-Za-z]+(?=(?P<dot>\.)?(?:{SPACE}|\n|$))")
_ABBREVIATION = re.compile(RULE_PATTERNS[[n for n, _ in RULE_PATTERNS].index("abbreviation")][1])


def _lex(text: str) -> Iterator[tuple[str, str, int]]:
    """(rule name, matched text, end) of each token of ``text``: at each position the longest
    match among :data:`RULES`, the earlier rule on a tie."""
    pos = 0
    while pos < len(text):
        best = _FAST.match(text, pos)
        if best and best.group("space"):
            name = "space"
        elif best and best.group().lower() not in SPLIT_WORDS and not (
                best.group("dot") and (len(best.group()) == 1 or _ABBREVIATION.match(text, pos)
                                       or best.group().lower() in NUMBER_ABBREVIATIONS)):
            name = "word"
        else:
            name, best = max(((n, m) for n, rule in RULES if (m := rule.match(text, pos))),
                             key=lambda nm: nm[1].end())  # max keeps the first of equals
        yield name, best.group(), best.end()
        pos = best.end()


def _quote(token: str, after: str) -> list[str]:
    """An ASCII quote as opening or closing, from the characters after it."""
    if token == '"':
        return ["``" if re.match(r"[A-Za-z0-9$]", after) else "''"]
    if token == "'":
        return ["`" if re.match(rf"{AZ}(?!{SPACE}|\n|$)", after) else "'"]
    return [token]


def _clitic_word(token: str, after: str) -> list[str]:
    """``don't`` -> ``do n't``, ``dog's`` -> ``dog 's``: the word, then its clitic."""
    clitic = re.search(rf"[nN]{APOS}[tT]{AZ}*$|{APOS}{AZ}+$", token)
    assert clitic is not None
    return [token[: clitic.start()].replace("\u00ad", ""), clitic.group().replace("\u2019", "'")]


def _split_word(token: str, after: str) -> list[str]:
    cut = SPLIT_WORDS[token.lower()]
    return [token[:cut], token[cut:]]


def _char(token: str, after: str) -> list[str]:
    if token in TRANSLATE:
        return [TRANSLATE[token]]
    return [] if _dropped(token) else [token]


def _entity(token: str, after: str) -> list[str]:
    name = token[1:-1].lower()
    return [] if name == "nbsp" else [ENTITIES.get(name, token)]


# rule name -> (matched text, the two characters after it) -> output tokens
ACTIONS: dict[str, Callable[[str, str], list[str]]] = {
    "keep": lambda token, after: [token],
    "abbreviation": lambda token, after: [token],
    "word": lambda token, after: [token.replace("\u00ad", "")],  # soft hyphens vanish
    "split_word": _split_word,
    "clitic_word": _clitic_word,
    "clitic": lambda token, after: [token.replace("\u2019", "'")],
    "t_is": lambda token, after: ["'t"],
    "fraction": lambda token, after: [token.replace(" ", "\u00a0")],
    "sgml": lambda token, after: [re.sub("[ \t]+", "\u00a0", token)],
    "entity": _entity,
    "emoticon": lambda token, after: [token.replace(")", "-RRB-").replace("(", "-LRB-")],
    "ellipsis": lambda token, after: ["..."],
    "dashes": lambda token, after: ["--"],
    "quote": _quote,
    "char": _char,
}


def ptb_tokenize_lines(lines: Sequence[str]) -> list[list[str]]:
    """Tokens of each caption as pycocoevalcap's PTB tokenizer gives them (lower-cased, before
    its punctuation removal). The captions are tokenised as one text, one per line, as
    pycocoevalcap does: a caption ending in a single letter's period depends on the next one."""
    if not lines:
        return []
    text = "\n".join(line.translate(LINE_BREAKS) for line in lines)
    out: list[list[str]] = [[]]
    for name, token, end in _lex(text):
        if name == "space":
            out.extend([] for _ in range(token.count("\n")))
        else:
            out[-1].extend(t.lower() for t in ACTIONS[name](token, text[end : end + 2]))
    return out


def ptb_tokens(text: str) -> list[str]:
    """Tokens of one caption on its own (see :func:`ptb_tokenize_lines`)."""
    return ptb_tokenize_lines([text])[0]
