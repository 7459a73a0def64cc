"""The test bed itself: Synapse delivers a message through /sync, and the
same message shows up on Synapse's Redis replication channel, which is what
mxsse will listen to."""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest
from testbed import http_json


def split_command(line: str) -> tuple[str, str, str, str, object]:
    """'RDATA <stream> <instance> <token|batch> <row_json>' -> parts.

    After the command name, split on the first three spaces only: the row
    JSON may contain spaces.
    """
    command, stream, instance, token, row = line.split(" ", 4)
    return command, stream, instance, token, json.loads(row)


def event_rows(lines: list[str]) -> list[tuple[str, list]]:
    """(token, row) of every RDATA line of the events stream."""
    parts = [split_command(line) for line in lines if line.startswith("RDATA events ")]
    return [(token, row) for _, _, _, token, row in parts]


def wait_for_timeline_event(client, since: str, room_id: str, event_id: str,
                            timeout: float = 20) -> dict:
    """Long-poll /sync from `since` until `event_id` shows up in room_id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.sync(since=since, timeout=5000)
        room = body.get("rooms", {}).get("join", {}).get(room_id, {})
        for event in room.get("timeline", {}).get("events", []):
            if event["event_id"] == event_id:
                return event
        since = body["next_batch"]
    pytest.fail(f"{event_id} not seen by {client.user_id} through /sync")


def test_message_reaches_sync_and_replication(bed, register):
    alice, bob = register("alice"), register("bob")

    # Subscribe before anything happens: pub/sub keeps no history.
    with bed.subscribe() as tap:
        room_id = alice.post("/createRoom", {"preset": "private_chat"})["room_id"]
        room = urllib.parse.quote(room_id)
        alice.post(f"/rooms/{room}/invite", {"user_id": bob.user_id})
        bob.post(f"/join/{room}")
        since = bob.sync()["next_batch"]

        event_id = alice.put(f"/rooms/{room}/send/m.room.message/txn1",
                             {"msgtype": "m.text", "body": "hello bob"})["event_id"]

        seen = wait_for_timeline_event(bob, since, room_id, event_id)
        assert seen["sender"] == alice.user_id
        assert seen["content"] == {"msgtype": "m.text", "body": "hello bob"}

        # Synapse publishes in order: once the message is here, so are the
        # rows of the invite and join that preceded it.
        line = tap.wait_for(lambda l: l.startswith("RDATA events ") and event_id in l)

    # The message: one row, so it carries its own stream token. The main
    # process publishes as instance "master".
    command, stream, instance, token, row = split_command(line)
    assert (command, stream, instance) == ("RDATA", "events", "master")
    assert token.isdigit()
    # ["ev", [event_id, room_id, type, state_key, redacts, relates_to,
    #         membership, rejected, outlier]]
    assert row == ["ev", [event_id, room_id, "m.room.message", None, None, None, None, False, False]]

    rows = event_rows(tap.lines)
    # The invite names the invitee in state_key: the only way to learn that
    # a user who is not yet in the room must be woken.
    invites = [r for _, r in rows if r[0] == "ev" and r[1][2] == "m.room.member"
               and r[1][3] == bob.user_id and r[1][6] == "invite"]
    assert len(invites) == 1 and invites[0][1][1] == room_id

    # State events also produce a ["state", [room_id, type, state_key,
    # event_id]] row in the same stream; rows sharing a token say "batch"
    # until the last one, which carries the number.
    invite_id = invites[0][1][0]
    index = next(i for i, (_, r) in enumerate(rows) if r[0] == "ev" and r[1][0] == invite_id)
    (invite_token, _), (state_token, state_row) = rows[index], rows[index + 1]
    assert invite_token == "batch" and state_token.isdigit()
    assert state_row == ["state", [room_id, "m.room.member", bob.user_id, invite_id]]

    # Nothing on this channel is a raw access token (those travel on
    # <server_name>/USER_IP, which must never be read).
    for secret in (alice.access_token, bob.access_token):
        assert not any(secret in l for l in tap.lines)


def test_bed_side_listeners(bed, register):
    """Metrics and the internal replication HTTP API answer on loopback."""
    status, metrics = http_json("GET", bed.metrics_url)
    assert status == 200 and "synapse_" in metrics

    carol = register("carol")
    path = f"/_synapse/replication/presence_set_state/{urllib.parse.quote(carol.user_id)}"
    body = {"device_id": carol.device_id, "state": {"presence": "online"},
            "force_notify": False, "is_sync": True}
    status, _ = http_json("POST", bed.replication_url + path, body, token="wrong-secret")
    assert status == 500  # Synapse answers a bad secret with a generic 500
    status, _ = http_json("POST", bed.replication_url + path, body, token=bed.replication_secret)
    assert status == 200
    presence = carol.get(f"/presence/{urllib.parse.quote(carol.user_id)}/status")
    assert presence["presence"] == "online"
