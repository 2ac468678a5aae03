"""The rollback stack, as pure functions shared by every backend.

Every activation that changes the active version pushes the version it replaced. A plain
rollback pops back to the newest entry that can still be served (not rejected, not the
version already active); rollbacks never push, so v1 → v2 → rollback → rollback gives v1 then
the base, never v2 again. A rollback to a named version drops the stack from that version's
newest entry up. The stack holds None for the base model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from registry.errors import NothingToRollBack
from registry.versions import BASE

Stack = list[str | None]

# Undo depth kept; older steps are forgotten (the base model stays the floor), so that a learner
# activating every version for months does not grow the stack without end.
MAX_DEPTH = 1000


def push_on_activate(stack: Sequence[str | None], previous: str | None, new: str | None) -> Stack:
    """The stack after `new` replaces `previous` through an activation."""
    if new == previous:
        return list(stack)  # re-activating the active version is not a step to undo
    return [*stack, previous][-MAX_DEPTH:]


def pop_for_rollback(
    stack: Sequence[str | None], active: str | None, is_rejected: Callable[[str], bool]
) -> tuple[str | None, Stack]:
    """(target, new stack) of a plain rollback; NothingToRollBack when the base is active and
    no servable earlier version remains."""
    remaining = list(stack)
    while remaining:
        candidate = remaining.pop()
        if candidate == active or (candidate is not None and is_rejected(candidate)):
            continue
        return candidate, remaining
    if active is None:
        raise NothingToRollBack()
    return None, []  # no earlier version left: the base model is the floor


def truncate_for_rollback_to(stack: Sequence[str | None], target: str | None) -> Stack:
    """The stack after a rollback to a named target: everything from its newest entry up is gone."""
    for index in range(len(stack) - 1, -1, -1):
        if stack[index] == target:
            return list(stack[:index])
    return list(stack)


def plan_rollback(
    stack: Sequence[str | None],
    active: str | None,
    to: str | None,
    *,
    is_rejected: Callable[[str], bool],
    check_servable: Callable[[str | None], None],
) -> tuple[str | None, Stack]:
    """(target, new stack) of a rollback: the stack rule without `to`; with it (BASE for the
    base model), `check_servable(target)` first, then the stack is cut at it."""
    if to is None:
        return pop_for_rollback(stack, active, is_rejected)
    target = None if to == BASE else to
    check_servable(target)
    return target, truncate_for_rollback_to(stack, target)
