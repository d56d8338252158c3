"""``/users/{owner}/lists``: read, replace and clear one user's allow and block lists of senders.

A key edits its own user's lists only: a user key's identity is its user, a relay identity (``relay_identities``)
edits the user it names in ``X-Flywheel-User``; admins edit anyone's. Anyone else gets 403, so one user can
never change what another user's mail is decided by. The lists are stored by ``models.userlists`` in the registry
directory the replicas share; a change is seen by every replica at its next request for that user.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from models.userlists import MAX_ENTRIES, ListError, UserLists
from services.api.deps import ORJSONResponse, Reporter, get_state, parse_json, read_body, require_reporter
from services.api.schemas import ErrorOut, ListsIn, ListsOut
from services.api.state import ServingState

router = APIRouter(tags=["user lists"])

_USER = Path(pattern=r"^[A-Za-z0-9._@+\-]{1,128}$", description="The user whose lists these are.")
_ERR = {"model": ErrorOut}
_MAX_BODY = 2 * MAX_ENTRIES * 300  # both lists full of the longest entries, with JSON's quoting


def _may_edit(request_reporter: Reporter, user: str, admins: list[str]) -> None:
    """403 unless the key speaks for ``user`` (its identity, or the user a relay names) or is an admin's."""
    if request_reporter.source in admins and request_reporter.name == request_reporter.source:
        return
    own = request_reporter.name.rpartition(":")[2] if request_reporter.name != request_reporter.source \
        else request_reporter.name
    if own != user:
        raise HTTPException(403, f"identity {request_reporter.name!r} may edit only its own user's lists ({own!r}); "
                                 "admins edit anyone's")


def _out(user: str, lists: UserLists) -> Response:
    return ORJSONResponse({"user": user, "allow": lists.allow, "block": lists.block,
                           "learning": len(lists.learning)})


ReporterDep = Annotated[Reporter, Depends(require_reporter)]
State = Annotated[ServingState, Depends(get_state)]
UserPath = Annotated[str, _USER]


@router.get("/users/{owner}/lists", response_model=ListsOut, responses={401: _ERR, 403: _ERR})
async def get_lists(owner: UserPath, reporter: ReporterDep, state: State) -> Response:
    """The user's allow and block lists (learned from their flags and edited here)."""
    _may_edit(reporter, owner, state.settings.admin_identities)
    return _out(owner, await run_in_threadpool(state.user_lists.get, owner))


@router.put("/users/{owner}/lists", response_model=ListsOut, responses={401: _ERR, 403: _ERR, 413: _ERR, 422: _ERR},
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ListsIn"}}}}})
async def put_lists(owner: UserPath, request: Request, reporter: ReporterDep, state: State) -> Response:
    """Replace both lists; what learning counted so far is kept."""
    _may_edit(reporter, owner, state.settings.admin_identities)
    body = await read_body(request, _MAX_BODY, state.settings.client_timeout_s)
    try:
        req = ListsIn.model_validate(parse_json(body))
    except ValidationError as exc:
        raise HTTPException(422, exc.errors(include_url=False, include_context=False, include_input=False)) from None
    try:
        lists = await run_in_threadpool(state.user_lists.put, owner, req.allow, req.block)
    except ListError as exc:
        raise HTTPException(422, str(exc)) from None
    return _out(owner, lists)


@router.delete("/users/{owner}/lists", status_code=204, responses={401: _ERR, 403: _ERR})
async def delete_lists(owner: UserPath, reporter: ReporterDep, state: State) -> Response:
    """Forget both lists and what learning counted: the user's mail is decided as everyone's again."""
    _may_edit(reporter, owner, state.settings.admin_identities)
    await run_in_threadpool(state.user_lists.delete, owner)
    return Response(status_code=204)

