"""Which tensor of a BiT weights file or module is which: by name, else by structure.

Why two ways: the authors' `.npz` files and the TF-Hub modules we know name
every tensor by its full path (`resnet/block1/unit01/a/group_norm/gamma`), but
a module's names are whatever its exporter's name scopes made of them. The
authors' own TF2 code (`bit_tf2`), run under tf_keras and saved with
`tf.saved_model.save`, gives 151 tensors with 10 distinct names (49 x
`group_norm/gamma`), because its nested Sequentials build outside the parent's
name scope; an export may also drop the `resnet/` prefix. What survives every
exporter is the structure: the module lists its variables in creation order
(root conv; per unit a-norm, a-conv, b-norm, b-conv, c-norm, c-conv, with the
projection after a-conv in our `bit_reference` module, before it in call
order, last as `bit_tf2` creates it; the final norm; a head), and each unit's
shapes follow from the architecture. So:

  * names first, when they are unique and name every tensor the model needs
    (full names, names without `resnet/`, wrapper prefixes, numbered convs);
  * otherwise by structure, unit by unit: the next tensors must have exactly
    the unit's shapes, in the a/b/c order, with the projection placed by its
    name where a name says `proj`, else by shape, else (block 1, where the
    projection and conv c have the same shape) as the later of the two, as
    creation order puts it;
  * neither works: one sentence saying where the structure breaks.

Whatever the mapping, hub weights are then compared with the module's own
output (`bit.self_check_against_module`), which refuses a wrong mapping
(two same-shaped GroupNorms listed in each other's place, say).

Keys are the authors' `.npz` keys (`resnet/...`, no `:0`); this module knows
their layout but not the Keras model (`bit.bit_weight_table` connects the two).
"""
from __future__ import annotations

import collections
import re
from typing import Sequence

import numpy as np

from pipeline.models.hub_io import ModuleVariable, WeightsError

HEAD_KEYS = (("resnet/head/conv2d/kernel", "resnet/head/conv2d/bias"),  # .npz / TF1 export
             ("resnet/head/dense/kernel", "resnet/head/dense/bias"))    # bit_tf2 Keras export
BY_NAME, BY_STRUCTURE = "by name", "by structure"
UNIT_ORDER = "a-norm, a-conv, b-norm, b-conv, c-norm, c-conv (+ projection)"
_BIT_SCOPES = r"root_block/|block\d+/unit\d+/|group_norm/|head/"


class _StructureMismatch(Exception):
    """The tensors, in order, are not a BiT of the expected shapes (message: where)."""


def canonical_weight_name(name: str) -> str:
    """The authors' `.npz`-style key for a tensor name from a file or SavedModel.

    Drops the `:0` slot suffix and any wrapper prefix before `resnet/`
    (`keras_layer/resnet/...`), adds `resnet/` to names exported without it
    (`block1/unit01/a/group_norm/gamma`, `group_norm/beta`), and drops the
    `standardized_conv2d_<n>` numbering some exports carry (the same
    normalization big_vision applies to BiT files).
    """
    name = re.sub(r":\d+$", "", name)
    match = re.search(r"(^|/)(resnet/.*)$", name)
    if match:
        name = match.group(2)
    elif re.match(_BIT_SCOPES, name):  # exported without the `resnet/` scope
        name = "resnet/" + name
    else:  # a wrapper's scope around such a name: keras_layer/block1/unit01/...
        match = re.search(r"/((?:root_block|block\d+/unit\d+)/.*)$", name)
        if match:
            name = "resnet/" + match.group(1)
    return re.sub(r"/standardized_conv2d_\d+/", "/standardized_conv2d/", name)


def infer_arch(arrays: dict[str, np.ndarray]) -> str:
    """Human hint of the architecture a set of the authors' tensors describes."""
    units: dict[int, int] = {}
    for key in arrays:
        match = re.match(r"resnet/block(\d+)/unit(\d+)/", key)
        if match:
            block, unit = int(match.group(1)), int(match.group(2))
            units[block] = max(units.get(block, 0), unit)
    if not units:
        return "no BiT ResNet-v2 at all (no resnet/block*/unit* tensors)"
    depths = tuple(units.get(b, 0) for b in range(1, max(units) + 1))
    hint = f"depths {depths}"
    root = arrays.get("resnet/root_block/standardized_conv2d/kernel")
    if root is not None and root.ndim == 4:
        hint += f", {root.shape[-1]} root filters (width x{root.shape[-1] / 64:g})"
    return hint


def _by_name(tensors: Sequence[ModuleVariable]) -> dict[str, np.ndarray] | None:
    """Canonical name -> array, or None when two tensors share a canonical name."""
    out: dict[str, np.ndarray] = {}
    for tensor in tensors:
        key = canonical_weight_name(tensor.name)
        if key in out:
            return None
        out[key] = np.asarray(tensor.value)
    return out


def _segments(expected: Sequence[tuple[str, tuple]]) -> list[tuple[str, list]]:
    """Consecutive expected (key, shape) grouped by unit: root, each unit, final norm."""
    groups: list[tuple[str, list]] = []
    for key, shape in expected:
        match = re.match(r"resnet/(root_block|block\d+/unit\d+)/", key)
        label = match.group(1) if match else "final GroupNorm"
        if not groups or groups[-1][0] != label:
            groups.append((label, []))
        groups[-1][1].append((key, tuple(shape)))
    return groups


def _in_order(slots, tensors) -> bool:
    return all(tuple(t.value.shape) == shape for (_, shape), t in zip(slots, tensors))


def _is_proj(tensor: ModuleVariable) -> bool:
    return bool(re.search(r"(^|[/_])proj(/|$)", f"{tensor.name}|{tensor.path}".lower()))


def _place_projection(label, slots, tensors):
    """Split the unit's projection off: ((key, tensor), remaining slots, remaining tensors)."""
    (p,) = [i for i, (key, _) in enumerate(slots) if "/proj/" in key]
    rest = slots[:p] + slots[p + 1:]
    viable = [i for i, t in enumerate(tensors)
              if tuple(t.value.shape) == slots[p][1]
              and _in_order(rest, tensors[:i] + tensors[i + 1:])]
    named = [i for i in viable if _is_proj(tensors[i])]
    if not viable:
        raise _StructureMismatch(f"{label}'s tensors are not in the order {UNIT_ORDER}")
    i = named[0] if len(named) == 1 else viable[-1]  # ties: created last (bit_tf2)
    return (slots[p][0], tensors[i]), rest, tensors[:i] + tensors[i + 1:]


def _norm_hint(tensor: ModuleVariable) -> str:
    return canonical_weight_name(tensor.name).rsplit("/", 1)[-1]


def _assign_segment(label, slots, tensors) -> dict[str, np.ndarray]:
    """One unit's keys -> arrays, given tensors whose shapes are the unit's (any order)."""
    pairs = []
    if any("/proj/" in key for key, _ in slots):
        proj, slots, tensors = _place_projection(label, slots, tensors)
        pairs.append(proj)
    if not _in_order(slots, tensors):
        raise _StructureMismatch(f"{label}'s tensors are not in the order {UNIT_ORDER}")
    ordered = list(zip((key for key, _ in slots), tensors))
    for i in range(len(ordered) - 1):  # a GroupNorm listed beta first, as its names say
        (k1, t1), (k2, t2) = ordered[i], ordered[i + 1]
        if (k1.endswith("/gamma") and k2.endswith("/beta")
                and (_norm_hint(t1), _norm_hint(t2)) == ("beta", "gamma")):
            ordered[i], ordered[i + 1] = (k1, t2), (k2, t1)
    pairs.extend(ordered)
    return {key: np.asarray(tensor.value) for key, tensor in pairs}


def _head(tensors) -> dict[str, np.ndarray]:
    """What follows the final norm: nothing, or a classification head (kernel + bias)."""
    if not tensors:
        return {}
    arrays = sorted((np.asarray(t.value) for t in tensors), key=lambda a: -a.ndim)
    if len(arrays) == 2 and arrays[0].ndim in (2, 4) and arrays[1].shape == arrays[0].shape[-1:]:
        return dict(zip(HEAD_KEYS[0], arrays))
    shapes = ", ".join(str(tuple(t.value.shape)) for t in tensors[:4])
    raise _StructureMismatch(f"{len(tensors)} tensors after the final GroupNorm are not a "
                             f"head (kernel and bias): shapes {shapes}")


def _by_structure(expected, tensors) -> dict[str, np.ndarray]:
    """The authors' key -> array from the tensors' order and shapes, unit by unit."""
    out: dict[str, np.ndarray] = {}
    pos = 0
    for label, slots in _segments(expected):
        chunk = list(tensors[pos:pos + len(slots)])
        want = collections.Counter(shape for _, shape in slots)
        have = collections.Counter(tuple(t.value.shape) for t in chunk)
        if want != have:
            raise _StructureMismatch(
                f"{label} (tensors {pos}-{pos + len(slots) - 1}) should have shapes "
                f"{sorted(want.elements())} but the module lists {sorted(have.elements())}")
        out.update(_assign_segment(label, slots, chunk))
        pos += len(slots)
    out.update(_head(list(tensors[pos:])))
    return out


def map_tensors(expected: Sequence[tuple[str, tuple]], tensors: Sequence[ModuleVariable], *,
                source: str) -> tuple[dict[str, np.ndarray], str]:
    """The authors' key -> array for `tensors` (a file's or module's, in its order).

    Args:
      expected: (authors' key, shape) of every backbone tensor the model needs,
        in the model's order (`bit.expected_tensors`).
      tensors: the source's tensors in the order it lists them.
      source: the handle or path, for messages.

    Returns:
      (arrays, how): `how` is `BY_NAME` or `BY_STRUCTURE`. With unique names
      that do not cover the model and no structural fit either, the names are
      returned, so the caller can say which tensors are missing or extra.

    Raises:
      WeightsError: names repeat and the structure does not fit (one line,
        naming the unit where it breaks).
    """
    named = _by_name(tensors)
    if named is not None and {key for key, _ in expected} <= named.keys():
        return named, BY_NAME
    try:
        return _by_structure(expected, tensors), BY_STRUCTURE
    except _StructureMismatch as err:
        if named is not None:
            return named, BY_NAME
        reason = str(err)
    counts = collections.Counter(re.sub(r":\d+$", "", t.name) for t in tensors)
    name, times = counts.most_common(1)[0] if counts else ("", 0)
    raise WeightsError(
        f"Weights {source!r} do not map onto this BiT model: their names do not identify "
        f"the tensors ({len(tensors)} tensors, {len(counts)} distinct names, {name!r} "
        f"{times} times), and by structure (the model needs {len(expected)} backbone tensors "
        f"in creation order) {reason}; pass a module or .npz of this BiT size.")
