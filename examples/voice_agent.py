"""A voice-style agent on samvad's websocket, with a barge-in.

Start a server (`make run`), then:

    python examples/voice_agent.py --url http://127.0.0.1:8080

Speech is simulated: the assistant's answer is "spoken" word by word, and the user barges in
halfway through. The agent then does what a real voice agent should:

- sends an `interruption` frame with what the user had heard and what they said;
- stores in the history only the part of the answer that was actually spoken;
- reads the session context back and answers the corrected question.

A second connection of the same user (a phone app, say) prints the events it is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from samvad.client import AgentConnection, SamvadClient
from samvad.realtime_models import MessageEvent, StateEvent, WipedEvent

QUESTION = "What is the interest rate on a home loan?"
ANSWER = (
    "Home loans start at 8.5 percent a year for a twenty year term, and salaried applicants "
    "get a further quarter percent off when their salary account is with us."
)
BARGE_IN_AFTER = 9  # words the user hears before cutting in
CORRECTION = "Sorry, I meant a car loan."
NEW_ANSWER = "Got it, a car loan: those start at 9.1 percent a year for up to seven years."


async def watch(phone: AgentConnection, say: Callable[[str], None]) -> None:
    async for event in phone.events():
        if isinstance(event, MessageEvent):
            say(f"    [phone] {event.message.role}: {event.message.content}")
        elif isinstance(event, StateEvent):
            say(f"    [phone] state is now {event.state}")
        elif isinstance(event, WipedEvent):
            say("    [phone] user data wiped")


async def speak(words: list[str], stop_after: int, word_delay: float) -> list[str]:
    """Play words until the user barges in; what was spoken."""
    spoken: list[str] = []
    for word in words:
        if len(spoken) == stop_after:
            break
        spoken.append(word)
        await asyncio.sleep(word_delay)
    return spoken


async def run(
    url: str,
    user_id: str | None = None,
    say: Callable[[str], None] = print,
    word_delay: float = 0.12,
) -> str:
    """Play the conversation; returns the session id."""
    user_id = user_id or f"caller-{secrets.token_hex(3)}"
    async with (
        SamvadClient(url) as api,
        AgentConnection(url, user_id, language="en-IN") as agent,
        AgentConnection(url, user_id) as phone,
    ):
        ready = agent.ready
        say(f"session {ready.session_id} for {user_id} (resumed: {ready.resumed})")
        watcher = asyncio.create_task(watch(phone, say))

        say(f"user      > {QUESTION}")
        await agent.send_message("user", QUESTION)
        await agent.set_state({"topic": "home loan", "stage": "answering"})

        words = ANSWER.split()
        spoken = await speak(words, BARGE_IN_AFTER, word_delay)
        heard = " ".join(spoken)
        say(f"assistant > {heard} ...")
        say(f"user      > {CORRECTION}   (barge-in after {len(spoken)} of {len(words)} words)")
        await agent.interrupt(
            heard=heard, content=CORRECTION, reason="barge-in", spokenWords=len(spoken)
        )
        # The history keeps what the user heard, not what the agent had planned to say.
        await agent.send_message("assistant", heard + " ...")
        await agent.send_message("user", CORRECTION)

        context = await agent.context()
        last = context.interruptions[-1]
        say(f"  (context: {len(context.history)} messages; last interruption heard {last.heard!r})")
        topic = "car loan" if "car loan" in (last.content or "") else "home loan"
        await agent.set_state({"topic": topic, "stage": "answered"})
        say(f"assistant > {NEW_ANSWER}")
        await agent.send_message("assistant", NEW_ANSWER)
        rtt = await agent.ping()
        say(f"  (ping {rtt * 1000:.1f} ms)")

        await agent.end()
        session = (await api.get_session(ready.session_id)).session
        stored = await api.interruptions(ready.session_id)
        say(f"session active: {session.is_active}; interruptions kept: {stored.count}")
        await phone.ping()  # answered after every event sent to the phone before it
        await phone.close()
        await watcher
        return ready.session_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the samvad server")
    parser.add_argument("--user", default=None, help="user id (default: a random one)")
    parser.add_argument("--word-delay", type=float, default=0.12, help="seconds per word")
    args = parser.parse_args()
    asyncio.run(run(args.url, args.user, word_delay=args.word_delay))


if __name__ == "__main__":
    main()
