"""Step-wise batched decoding over a KV cache: the torch half of the engine's scheduler.

A `Batch` holds the rows (generations) that decode together, one shared `DynamicCache` and a 2-D attention mask.
Rows have different prompt lengths, so the cache is *left*-padded: every row's real tokens end at the last
column, and padding columns are masked out. Positions are passed explicitly per row (a row's position is the
number of its real tokens so far), so padding never shifts a row's rotary positions.

- `prefill(rows)` runs the new rows' prompts as their own small batch, then merges that cache into the running
  one by left-padding whichever is shorter; new requests join a batch that is already decoding. With a
  `PrefixCache` (refact_lab.serve.prefix_cache), a row whose prompt starts like a recent one starts from that
  prompt's stored columns and runs only the rest.
- `step()` feeds each row's last sampled token and returns the next-token logits for every row.
- `feed(tokens per row)` / `settle(kept per row)`: one pass in which each row is fed several tokens (its last one
  and drafted ones, refact_lab.serve.speculative; or, for a row that joined with `admit`, the rest of its prompt
  after the columns the prefix cache stored), then each row keeps the columns of the tokens it accepted. A row's
  rejected columns become padding inside the batch (masked, as left padding is); columns no row keeps are given
  back.
- `keep(indices)` drops finished or cancelled rows from the cache and mask, then trims columns that are padding
  for every remaining row.

Sampling (`sample`) is per row: greedy for temperature 0, otherwise temperature and nucleus (top-p) sampling
with the row's own seeded generator when the request gave a seed.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(model) -> str:
    """transformers 5 calls the cache argument `cache`; 4.x called it `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(base)
    if kind not in _CACHE_KWARG:
        params = inspect.signature(kind.forward).parameters
        _CACHE_KWARG[kind] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[kind]


def input_device(model):
    """Where input ids must live (the embedding's device; with a device map, layers may sit elsewhere)."""
    return model.get_input_embeddings().weight.device


def _slack_layer_class():
    """A DynamicLayer whose keys/values are views into buffers with spare rows and columns.

    DynamicLayer appends a token with torch.cat, copying the whole cache of every row on every step; with 16 rows
    of a few hundred tokens that copy cost as much as the model's matmuls on a CPU. Here a step writes one column
    in place and the buffer grows by half its length when full. Rows are slots: a row that leaves the batch takes
    the last row's slot (`select_rows` copies that one row, not the batch), and a row that joins is written into the
    next free slot (`join`). Spare columns on the left take the padding when a longer prompt joins (`_shift`), so
    the batch is not copied then either. Code that replaces `keys`/`values` outright is noticed by identity and the
    buffer is rebuilt from the new tensors.
    """
    from transformers.cache_utils import DynamicLayer

    class SlackLayer(DynamicLayer):
        _kbuf = _vbuf = _kview = None  # buffers from the batch's first column on (views of _kbase / _vbase)
        _kbase = _vbase = None
        _off = 0  # where the first column sits in the base buffers; the columns before it are spare

        @classmethod
        def holding(cls, keys, values) -> "SlackLayer":
            layer = cls()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            return layer

        def _ensure(self, rows: int, columns: int, like) -> None:
            """Buffers with room for `rows` rows of `columns` columns, holding the current keys/values."""
            fresh = self.keys is not self._kview
            if fresh or rows > self._kbuf.shape[0] or columns > self._kbuf.shape[2]:
                n = self.keys.shape[-2] if self.keys is not None and self.keys.numel() else 0
                self._reserve(n, columns + max(32, columns // 2), like, rows=self._row_room(rows))

        @staticmethod
        def _row_room(rows: int) -> int:
            """Rows to allocate for `rows`: spare ones for rows that join later (none for a lone row)."""
            return rows if rows <= 1 else rows + rows // 2

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            rows = key_states.shape[0]
            n = self.keys.shape[-2] if self.keys.numel() else 0
            add = key_states.shape[-2]
            self._ensure(rows, n + add, key_states)
            self._kbuf[:rows, :, n:n + add] = key_states
            self._vbuf[:rows, :, n:n + add] = value_states
            self._view(rows, n + add)
            return self.keys, self.values

        def reserve(self, add: int):
            """Views of the key and value buffers over the batch's rows and every column, with room for `add`
            more columns after the current ones (for a caller that writes them itself,
            refact_lab.serve.decode_step; `advance` then takes them in)."""
            rows, n = self.keys.shape[0], self.keys.shape[-2]
            self._ensure(rows, n + add, self.keys)
            return self._kbuf[:rows], self._vbuf[:rows]

        def advance(self, total: int) -> None:
            self._view(self.keys.shape[0], total)

        def _view(self, rows: int, columns: int) -> None:
            self.keys = self._kview = self._kbuf[:rows, :, :columns]
            self.values = self._vbuf[:rows, :, :columns]

        def select_rows(self, keep: list[int]) -> list[int]:
            """Keep the rows at these indices; returns the new order (which old row each slot now holds). A row
            after the kept count moves into a freed slot: one row copied per row that left, not the batch."""
            import torch

            count = len(keep)
            kept = set(keep)
            holes = [i for i in range(count) if i not in kept]
            movers = [i for i in sorted(kept) if i >= count]
            order = [i if i in kept else movers[holes.index(i)] for i in range(count)]
            rows, n = self.keys.shape[0], self.keys.shape[-2]
            if self.keys is not self._kview:
                idx = torch.tensor(order, dtype=torch.long, device=self.keys.device)
                self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
                return order
            for hole, mover in zip(holes, movers):
                self._kbuf[hole, :, :n] = self._kbuf[mover, :, :n]
                self._vbuf[hole, :, :n] = self._vbuf[mover, :, :n]
            self._view(count, n)
            return order

        def join(self, keys, values, width: int) -> None:
            """Append rows (keys/values [m, heads, columns <= width, dim]) after the current ones, the batch now
            `width` columns wide: every row ends at the last column (left padding, zeros: masked, never NaN)."""
            rows, n = self.keys.shape[0], self.keys.shape[-2]
            m, length = keys.shape[0], keys.shape[-2]
            if width > n:
                # the newcomers are longer: every row shifts right (the one case that copies the whole batch)
                self._shift(width - n, rows + m)
                n = width
            else:
                self._ensure(rows + m, n, self.keys)
            for buf, new in ((self._kbuf, keys), (self._vbuf, values)):
                buf[rows:rows + m, :, :n - length] = 0
                buf[rows:rows + m, :, n - length:n] = new
            self._view(rows + m, n)

        def _shift(self, by: int, rows: int) -> None:
            """Every current row gets `by` more columns of padding on the left (for a longer newcomer; `rows`: the
            rows the batch will hold). Into the buffer's spare columns on the left when it has them: only those
            columns are zeroed, nothing is copied."""
            import torch

            old_rows, n = self.keys.shape[0], self.keys.shape[-2]
            if self.keys is self._kview and self._off >= by and rows <= self._kbuf.shape[0]:
                self._set_offset(self._off - by)
            else:
                like = self.keys
                columns = n + by
                left = self._left_room(columns)
                shape = (self._row_room(rows), like.shape[1], left + columns + max(32, columns // 2), like.shape[3])
                kbase = torch.empty(shape, dtype=like.dtype, device=like.device)
                vbase = torch.empty(shape, dtype=like.dtype, device=like.device)
                kbase[:old_rows, :, left + by:left + columns] = self.keys
                vbase[:old_rows, :, left + by:left + columns] = self.values
                self._kbase, self._vbase = kbase, vbase
                self._set_offset(left)
            self._kbuf[:old_rows, :, :by] = 0  # padding: masked, but never NaN
            self._vbuf[:old_rows, :, :by] = 0
            self._view(old_rows, n + by)

        @staticmethod
        def _left_room(columns: int) -> int:
            """Spare columns before the first one: room for newcomers longer than the batch without a copy."""
            return max(32, columns // 4)

        def _set_offset(self, off: int) -> None:
            self._off = off
            self._kbuf, self._vbuf = self._kbase[:, :, off:], self._vbase[:, :, off:]

        def drop_columns(self, first: int) -> None:
            """Forget the first columns (padding for every row): a view of the same buffer, nothing copied."""
            if self.keys is self._kview:
                rows, n = self.keys.shape[0], self.keys.shape[-2]
                self._set_offset(self._off + first)
                self._view(rows, n - first)
            else:
                self.keys, self.values = self.keys[:, :, first:], self.values[:, :, first:]

        def crop(self, tokens_to_remove: int) -> None:
            """Forget the last -tokens_to_remove columns (rejected speculative drafts), keeping the buffer: the
            next update writes over them in place (DynamicLayer's crop would make the next update copy all)."""
            drop = abs(tokens_to_remove)
            if drop == 0 or not self.is_initialized:
                return
            n = self.keys.shape[-2] - drop
            if self.keys is self._kview:
                self._view(self.keys.shape[0], n)
            else:
                self.keys, self.values = self.keys[:, :, :n], self.values[:, :, :n]

        def _reserve(self, n: int, capacity: int, like, rows: int | None = None) -> None:
            import torch

            current = self.keys.shape[0] if self.keys is not None and self.keys.numel() else 0
            rows = max(rows or like.shape[0], current)
            left = self._left_room(capacity) if rows > 1 else 0  # a lone row never shifts
            shape = (rows, like.shape[1], left + capacity, like.shape[3])
            kbase = torch.empty(shape, dtype=like.dtype, device=like.device)
            vbase = torch.empty(shape, dtype=like.dtype, device=like.device)
            if n and current:
                kbase[:current, :, left:left + n] = self.keys
                vbase[:current, :, left:left + n] = self.values
            self._kbase, self._vbase = kbase, vbase
            self._set_offset(left)
            if n and current:
                self._view(current, n)

    return SlackLayer


_SLACK_LAYER = None


def new_cache(layers=None):
    """An empty DynamicCache whose layers append in place (or one holding these (keys, values) pairs)."""
    from transformers import DynamicCache

    global _SLACK_LAYER
    if _SLACK_LAYER is None:
        _SLACK_LAYER = _slack_layer_class()
    cache = DynamicCache()
    cache.layer_class_to_replicate = _SLACK_LAYER
    if layers:
        cache.layers = [_SLACK_LAYER.holding(k, v) for k, v in layers]
    return cache


def forward(model, decoder, ids, positions, cache, mask, padded: bool, twin=None, fed=None, want=None):
    """Logits [rows, tokens, vocab] of `ids` continuing `cache`; `mask` [rows, columns] already counts the new
    columns. Through the engine's lean step (refact_lab.serve.decode_step) when the model has one, and then through
    the bf16 `twin` (serve/bf16_twin.py) when the caller passes one; that step skips the padding tokens (`fed`)
    and the logits nobody reads (`want`), which transformers' forward computes anyway."""
    if decoder is not None:
        return decoder.forward(model, ids, positions, cache, mask, padded, twin, fed, want)
    # Without padding (one request, or rows of equal length) the mask says nothing: leaving it out lets the
    # attention take its plain causal path instead of building a 4-D mask every step.
    out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions, use_cache=True,
                **{cache_kwarg(model): cache})
    return out.logits


class Batch:
    """Rows decoding together on one adapter. Rows are objects with `prompt_ids`, `pos` and `last_token`."""

    def __init__(self):
        self.rows: list[Any] = []
        self.cache = None
        self.mask = None  # [rows, columns] long, 1 where the column holds a real token of that row
        self.padded = False  # whether any row has padding columns (then the mask must be passed)

    def __len__(self) -> int:
        return len(self.rows)

    def prefill(self, model, new_rows: Sequence[Any], prefixes=None, key=None, decoder=None, twin=None, reuse=None):
        """Run the new rows' prompts and merge them into the batch; returns their next-token logits [n, vocab].

        With `prefixes` (a `PrefixCache`), a row whose prompt shares a long enough prefix with a stored prompt of
        adapter `key` starts from a copy of those stored columns and runs only the rest of its prompt (alone:
        rows with different reused lengths do not line up in one batch); the other rows run together as before.
        Every new row's prompt KV is stored afterwards. With `twin` (a `Bf16Twin` whose `current` copy is set),
        prompts and rests long enough for it run through that bf16 copy; the cache stays fp32. `reuse`: the
        lookups' results when the caller made them already."""
        import torch

        if reuse is None:
            reuse = [prefixes.lookup(key, r.prompt_ids) if prefixes is not None and prefixes.enabled else (0, None)
                     for r in new_rows]
        fresh = [i for i, (n, _) in enumerate(reuse) if n == 0]
        logits: list[Any] = [None] * len(new_rows)
        joining = Batch()  # the newcomers, put together first so the running batch is rebuilt only once
        if fresh:
            rows = [new_rows[i] for i in fresh]
            cache, mask, out = self._run_prompts(model, rows, twin)
            for j, i in enumerate(fresh):
                logits[i] = out[j]
            if prefixes is not None and prefixes.enabled:
                for j, r in enumerate(rows):
                    n = len(r.prompt_ids)  # the row's real columns are the last n (left padding)
                    prefixes.store(key, r.prompt_ids, [(layer.keys[j:j + 1, :, -n:].clone(),
                                                        layer.values[j:j + 1, :, -n:].clone())
                                                       for layer in cache.layers])
            joining._merge(cache, mask, rows)
        for i, (n, stored) in enumerate(reuse):
            if n == 0:
                continue
            r = new_rows[i]
            cache, mask, out = self._run_rest(model, r, n, stored, decoder, twin)
            logits[i] = out[0]
            prefixes.store(key, r.prompt_ids, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
            joining._merge(cache, mask, [r])
        for r in new_rows:
            r.pos = len(r.prompt_ids)
        self._merge(joining.cache, joining.mask, joining.rows)
        return torch.stack(logits)

    @staticmethod
    def _run_prompts(model, rows: Sequence[Any], twin=None):
        """Whole prompts as one left-padded batch: (cache, mask, last logits [rows, vocab])."""
        import torch

        from refact_lab.serve.bf16_twin import widen

        device = input_device(model)
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            n = len(r.prompt_ids)
            ids[i, width - n:] = torch.tensor(r.prompt_ids, dtype=torch.long, device=device)
            mask[i, width - n:] = 1
        # Left padding: a row's first real token gets position 0; pad columns get 0 too (they are masked out).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache()
        padded = bool((mask == 0).any())
        real = sum(len(r.prompt_ids) for r in rows)
        runner = twin.current if twin is not None and twin.wants_prompt(real) else model
        out = runner(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions, use_cache=True,
                     logits_to_keep=1, **{cache_kwarg(runner): cache})
        logits = out.logits[:, -1, :]  # the cache object was filled in place
        if runner is not model:
            twin.counted(real)
            cache, logits = widen(cache, torch.float32), logits.float()
        return cache, mask, logits

    @staticmethod
    def _run_rest(model, row, n: int, stored, decoder=None, twin=None):
        """One prompt whose first n tokens' keys/values are stored: run tokens n.. at positions n.. on a cache
        holding a view of those columns (the first write copies them into the cache's own buffer)."""
        import torch

        from refact_lab.serve.bf16_twin import widen

        device = input_device(model)
        total = len(row.prompt_ids)
        ids = torch.tensor([row.prompt_ids[n:]], dtype=torch.long, device=device)
        positions = torch.arange(n, total, dtype=torch.long, device=device).unsqueeze(0)
        cache = new_cache([(k[:, :, :n], v[:, :, :n]) for k, v in stored])
        mask = torch.ones((1, total), dtype=torch.long, device=device)
        # as a decode pass over this many tokens would (Engine._pass): in the bf16 copy when its one-row steps or
        # prompts this long are faster there (a 5-token rest in fp32 took 6.6 ms beside 16 bf16 rows' 7.4 ms)
        wide = twin is not None and (twin.wants_step(1) or twin.wants_prompt(total - n))
        if decoder is None and wide:
            cache = new_cache([(k[:, :, :n].to(torch.bfloat16), v[:, :, :n].to(torch.bfloat16)) for k, v in stored])
            out = twin.current(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                               **{cache_kwarg(twin.current): cache})
            twin.counted(total - n)
            return widen(cache, torch.float32), mask, out.logits[:, -1, :].float()
        # one row without padding: the attention's plain causal path (queries sit at columns n..)
        logits = forward(model, decoder, ids, positions, cache, mask, padded=False, twin=twin if wide else None)
        return cache, mask, logits[:, -1, :]

    def step(self, model, decoder=None, twin=None):
        """Feed every row its last token; returns next-token logits [rows, vocab] (through the bf16 `twin` if
        given)."""
        import torch

        device = input_device(model)
        ids = torch.tensor([[r.last_token] for r in self.rows], dtype=torch.long, device=device)
        positions = torch.tensor([[r.pos] for r in self.rows], dtype=torch.long, device=device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype,
                                                     device=self.mask.device)], dim=1)
        logits = forward(model, decoder, ids, positions, self.cache, self.mask, self.padded, twin)
        for r in self.rows:
            r.pos += 1
        return logits[:, -1, :]

    def admit(self, rows: Sequence[Any], stored: Sequence[tuple[int, Any]]) -> None:
        """Join rows whose first n prompt tokens' keys/values are stored (`stored[i]`: (n, [(keys, values)] per
        layer, as `PrefixCache.lookup` gives them): their columns are copied into the batch's rows and the rows
        start at position n; `feed` then runs the rest of their prompts, beside the other rows' next tokens."""
        import torch

        for r, (n, layers) in zip(rows, stored):
            cache = new_cache([(k[:, :, :n], v[:, :, :n]) for k, v in layers])
            r.pos = n
            self._merge(cache, torch.ones((1, n), dtype=torch.long, device=layers[0][0].device), [r])

    def feed(self, model, feeds: Sequence[Sequence[int]], decoder=None, twin=None, read_from: Sequence[int] = ()):
        """One pass in which row i is fed the tokens feeds[i] (at least one; its last token and drafts after it,
        or the rest of a newcomer's prompt) at its next positions; returns logits [rows, t, vocab], t the longest
        feed (row i's logits after its own tokens mean nothing). Every row gets t new columns; `settle` then says
        how many of them each row keeps. `read_from[i]`: the first of row i's positions whose logits the caller
        reads (the ones before are a prompt's rest; default 0); others may come back as zeros."""
        import torch

        device = input_device(model)
        rows, t = len(self.rows), max(len(f) for f in feeds)
        ids = torch.zeros((rows, t), dtype=torch.long)
        positions = torch.zeros((rows, t), dtype=torch.long)
        fed = torch.zeros((rows, t), dtype=self.mask.dtype)
        for i, (r, f) in enumerate(zip(self.rows, feeds)):
            ids[i, :len(f)] = torch.tensor(f, dtype=torch.long)
            fed[i, :len(f)] = 1
            # a padding column gets its row's last real position (masked out; never past the model's positions)
            positions[i] = torch.arange(t).clamp(max=len(f) - 1) + r.pos
        self._block = (self.mask.shape[1], t)
        self.mask = torch.cat([self.mask, fed.to(self.mask.device)], dim=1)
        padded = self.padded or any(len(f) < t for f in feeds)
        want = fed.bool()
        for i, first in enumerate(read_from):
            want[i, :first] = False
        return forward(model, decoder, ids.to(device), positions.to(device), self.cache, self.mask, padded, twin,
                       fed.bool().to(device), want.to(device))

    def prompt_kv(self, i: int, length: int, rest: int) -> list[tuple[Any, Any]]:
        """Right after `feed`, for a row fed the last `rest` tokens of its prompt first (drafts may follow them):
        copies of the keys/values of the prompt's `length` tokens (per layer, [1, heads, length, dim]), for the
        prefix cache."""
        end = self._block[0] + rest
        return [(layer.keys[i:i + 1, :, end - length:end].clone(), layer.values[i:i + 1, :, end - length:end].clone())
                for layer in self.cache.layers]

    def settle(self, kept: Sequence[int]) -> None:
        """After `feed`: row i keeps the first kept[i] of the columns it was fed (its position moves on by as
        many) and the rest become padding (a rejected draft: masked out from now on); columns no row keeps are
        given back."""
        start, t = self._block
        for i, (r, k) in enumerate(zip(self.rows, kept)):
            self.mask[i, start + k:] = 0
            r.pos += k
        drop = t - max(kept)
        if drop > 0:
            for layer in self.cache.layers:
                layer.crop(-drop)
            self.mask = self.mask[:, :-drop]
        self.padded = bool((self.mask == 0).any())

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows. A row after the kept count moves into a freed slot, so the remaining rows may
        change order: read `rows` afterwards."""
        import torch

        if len(indices) == len(self.rows):
            return
        if not indices:
            self.rows, self.cache, self.mask, self.padded = [], None, None, False
            return
        order = indices
        for layer in self.cache.layers:
            order = layer.select_rows(indices)
        self.mask = self.mask.index_select(0, torch.tensor(order, dtype=torch.long, device=self.mask.device))
        self.rows = [self.rows[i] for i in order]
        self._trim()
        self.padded = bool((self.mask == 0).any())

    def _trim(self) -> None:
        """Drop leading columns that are padding for every row (left after long rows finished)."""
        used = self.mask.any(dim=0)
        first = int(used.long().argmax()) if bool(used.any()) else self.mask.shape[1]
        if first == 0:
            return
        for layer in self.cache.layers:
            layer.drop_columns(first)
        self.mask = self.mask[:, first:]

    def _merge(self, cache, mask, rows: list[Any]) -> None:
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            self.padded = bool((mask == 0).any())
            return
        width = max(self.mask.shape[1], mask.shape[1])
        old_layers = self.cache.layers  # SlackLayers: the newcomers' rows are written into their spare slots

        def pad(t, dim: int):
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

        for old, new in zip(old_layers, cache.layers):
            old.join(new.keys.to(old.keys.device), new.values.to(old.values.device), width)
        self.mask = torch.cat([pad(self.mask, 1), pad(mask.to(self.mask.device), 1)], dim=0)
        self.rows = self.rows + rows
        self.padded = bool((self.mask == 0).any())


def sample(logits, rows: Sequence[Any]) -> list[int]:
    """One next token per row, honouring each row's temperature, top_p and seeded generator."""
    import torch

    healing = [i for i, r in enumerate(rows) if getattr(r, "first_allowed", None) and not r.generated]
    if healing:
        # token healing: a row's first token must continue the word the prompt's last token was cut from
        logits = logits.clone()
        for i in healing:
            allowed = torch.tensor(rows[i].first_allowed, dtype=torch.long, device=logits.device)
            row = torch.full_like(logits[i], float("-inf"))
            row[allowed] = logits[i, allowed]
            logits[i] = row
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for i, r in enumerate(rows):
        p = r.params
        if p.temperature <= 0:
            out.append(greedy[i])
            continue
        gen = r.generator
        # in float64, from the best logit down: a temperature as small as 1e-300 (valid JSON, and OpenAI's range
        # starts at 0) would make x / t overflow in float32 and the softmax NaN; here it is all but greedy
        x = logits[i].double()
        if gen is not None and gen.device != x.device:
            x = x.to(gen.device)
        probs = torch.softmax((x - x.max()) / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(-1) - sorted_probs > p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            choice = torch.multinomial(sorted_probs, 1, generator=gen)
            out.append(int(order[choice]))
        else:
            out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out
