"""Splitting a .txt / .md document into passages, each starting with the headings above it, and finding its title.

Separate from ReadCorpus because it is pure text work on a decoded document: no files, no rows, no Beam. It reads just
enough Markdown to cut in the right places (ATX and setext headings, fenced code blocks, horizontal rules) and drops
nothing but markup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.stages.corpus_files import file_stem

_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_THEMATIC_BREAK = re.compile(r"^ {0,3}(?:(?:\*[ \t]*){3,}|(?:-[ \t]*){3,}|(?:_[ \t]*){3,}|(?:=[ \t]*){3,})$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


@dataclass(frozen=True)
class _Block:
    line: int  # 1-based line where the block starts
    text: str
    heading: bool


def _blocks(text: str) -> list[_Block]:
    """Paragraphs (separated by blank lines) and headings (ATX `# x` or setext underlined), in order.

    A fenced code block is one paragraph even where it holds blank lines, so code is never split mid-block here.
    """
    blocks: list[_Block] = []
    lines: list[str] = []
    start = 0
    in_fence = False

    def flush() -> None:
        if lines:
            blocks.append(_Block(start, "\n".join(lines), False))
            lines.clear()

    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif in_fence:
            pass
        elif not line.strip():
            flush()
            continue
        elif heading := _HEADING.match(line):
            flush()
            blocks.append(_Block(number, heading.group(1), True))
            continue
        elif _SETEXT_UNDERLINE.match(line) and lines:
            # Under one line, an underline makes it a heading; under a longer paragraph it is read as a rule (markup),
            # not a heading: plain-text files underline whole paragraphs as separators.
            if len(lines) == 1:
                blocks.append(_Block(start, lines[0].strip(), True))
                lines.clear()
            flush()
            continue
        elif not lines and _THEMATIC_BREAK.match(line):
            continue  # a horizontal rule is markup, not text
        if not lines:
            start = number
        lines.append(line)
    flush()
    return blocks


def _word_count(text: str) -> int:
    return len(text.split())


def _split_long(block: _Block, target_words: int) -> list[tuple[int, str]]:
    """A paragraph over the target -> pieces of about `target_words`, cut between lines where it has lines (so code
    and lists keep their shape), and between words inside a single overlong line."""
    pieces: list[tuple[int, str]] = []
    current: list[str] = []
    current_start = block.line
    words = 0
    for offset, line in enumerate(block.text.split("\n")):
        number = block.line + offset
        line_words = line.split()
        if len(line_words) > target_words:
            if current:
                pieces.append((current_start, "\n".join(current)))
                current, words = [], 0
            pieces += [(number, " ".join(line_words[i:i + target_words]))
                       for i in range(0, len(line_words), target_words)]
            continue
        if current and words + len(line_words) > target_words:
            pieces.append((current_start, "\n".join(current)))
            current, words = [], 0
        if not current:
            current_start = number
        current.append(line)
        words += len(line_words)
    if current:
        pieces.append((current_start, "\n".join(current)))
    return pieces


def split_document(text: str, target_words: int = 200) -> list[tuple[int, str]]:
    """A .txt / .md document -> passages as (1-based start line, text).

    Headings start a new passage and are kept as its first line (without `#`), so a passage says what it is about;
    headings with no text of their own join the next passage. Paragraphs of one section are merged while the passage
    stays within `target_words`; a paragraph over the target is split (between lines, else between words). Nothing is
    dropped except markup (blank lines, `#` markers, setext underlines, horizontal rules).
    """
    passages: list[tuple[int, str]] = []
    parts: list[str] = []
    start = 0
    words = 0
    pending_headings: list[_Block] = []

    def flush() -> None:
        nonlocal words
        if parts:
            passages.append((start, "\n\n".join(parts)))
            parts.clear()
            words = 0

    for block in _blocks(text):
        if block.heading:
            flush()
            pending_headings.append(block)
            continue
        pieces = _split_long(block, target_words) if _word_count(block.text) > target_words else [
            (block.line, block.text)]
        for line, piece in pieces:
            piece_words = _word_count(piece)
            if parts and words + piece_words > target_words:
                flush()
            if not parts:
                start = pending_headings[0].line if pending_headings else line
                parts.extend(heading.text for heading in pending_headings)
                words = sum(_word_count(heading.text) for heading in pending_headings)
                pending_headings.clear()
            parts.append(piece)
            words += piece_words
    flush()
    if pending_headings:  # trailing headings with no text after them: still text of the document
        passages.append((pending_headings[0].line, "\n\n".join(heading.text for heading in pending_headings)))
    return passages


def document_title(text: str, path: str) -> str:
    """The document's first heading, else its file stem (`docs/install.md` -> `install`)."""
    for block in _blocks(text):
        if block.heading:
            return block.text
    return file_stem(path)
