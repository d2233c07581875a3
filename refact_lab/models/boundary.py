"""Where a cursor's token boundary is: the one definition shared by token healing, FIM training splits and the
default model's recipe.

Byte-level BPE tokenizers (GPT-2, Qwen, StarCoder, DeepSeek: "ByteLevel" pre-tokenization) cut text into
chunks before merging bytes, and a chunk never straddles the boundaries below. Code typed after the cursor
joins the chunk the cursor is in:

- a word, number or run of symbols the cursor ends ("    ret|", "x.va|", "foo(|") continues: its chunk
  starts at the run, with the one space before it (" ret");
- whitespace before the cursor keeps all but its last space: code that follows takes that space
  ("\\n        |self" is "\\n       " + " self", "s = |x" is " =" + " x");
- after a newline or a tab the chunk starts at the cursor.

`cursor_boundary(text)` is the offset where that chunk starts. A prompt cut there ends the way the model saw
text end in training, and the text between the boundary and the cursor is what the first generated token must
start with (`refact_lab.models.healing`); training splits its FIM examples at the same offset
(`refact_lab.finetune.fim`), so the model learns the prompts healing builds.
"""

from __future__ import annotations


def _kind(c: str) -> str:
    if c.isalpha():
        return "letter"
    if c.isdigit():
        return "digit"
    if c.isspace():
        return "space"
    return "symbol"


def cursor_boundary(text: str, cursor: int | None = None) -> int:
    """The offset (<= cursor) where the pre-tokenizer chunk holding the cursor starts, assuming code (not
    whitespace) is typed next. `cursor` defaults to the end of `text`; only text before it is read."""
    i = len(text) if cursor is None else cursor
    if i == 0:
        return 0
    last = text[i - 1]
    kind = _kind(last)
    if kind == "space":
        # "\s+(?!\S)" leaves the last space of a run to the word after it; a newline or tab stays put
        return i - 1 if last == " " else i
    j = i
    while j > 0 and _kind(text[j - 1]) == kind:
        j -= 1
    # " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": one leading space belongs to the chunk
    return j - 1 if j > 0 and text[j - 1] == " " else j
