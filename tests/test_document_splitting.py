"""Splitting .txt / .md documents into passages, and their titles (pipelines/stages/document_splitting.py)."""

from __future__ import annotations

from pipelines.stages.document_splitting import document_title, split_document

DOC = """# Guide

Short intro.

Another short paragraph.

## Install
### From PyPI

```bash
pip install embforge

pip install embforge[dev]
```

## Reference
""" + " ".join(f"w{i}" for i in range(450)) + """

---
Closing words.
"""


def _words(text: str) -> list[str]:
    # Markup the splitter drops: heading markers and the horizontal rule.
    return [word for word in text.split() if word not in ("#", "##", "###", "---")]


def test_documents_split_on_headings_and_merge_small_paragraphs():
    passages = split_document(DOC, target_words=200)
    texts = [text for _, text in passages]
    assert texts[0] == "Guide\n\nShort intro.\n\nAnother short paragraph."
    # A heading with no text of its own joins the next passage; the fenced block survives its blank line.
    assert texts[1] == "Install\n\nFrom PyPI\n\n```bash\npip install embforge\n\npip install embforge[dev]\n```"
    assert [line for line, _ in passages[:2]] == [1, 7]
    assert texts[2].startswith("Reference\n\nw0 w1")
    # Nothing but markup is dropped, and no passage is far over the target.
    assert sorted(word for text in texts for word in text.split()) == sorted(_words(DOC))
    assert all(len(text.split()) <= 201 for text in texts)
    assert texts[-1].endswith("Closing words.")


def test_a_big_paragraph_is_split_to_the_target():
    lines = "\n".join(" ".join(["x"] * 30) for _ in range(20))  # one paragraph, 20 lines, 600 words
    passages = split_document(lines, target_words=100)
    assert [len(text.split()) for _, text in passages] == [90] * 6 + [60]
    assert [line for line, _ in passages] == [1, 4, 7, 10, 13, 16, 19]


def test_document_title_is_the_first_heading_or_the_file_stem():
    assert document_title(DOC, "docs/guide.md") == "Guide"
    assert document_title("Title\n=====\n\ntext", "x.txt") == "Title"
    assert document_title("no heading here", "notes/meeting.notes.txt") == "meeting.notes"
