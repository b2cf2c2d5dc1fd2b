"""A scripted world for supporter tests, served by the stub OpenAI server (stub_server.py).

One reply function plays every role, told apart by the prompt files the request was built from:
the supporter (the four-step template; the alternative with the reversed Step 3), the seeker (who
talks about their career after a supporter reply that mentions it, and ends after three turns),
the target value detector ('Achievement'), the reference generator, the LLM value detector (Yes
only for Achievement in a text about a career) and the emotion judge. The initial response
mentions the career, the alternative does not: with the value reward the initial one wins.
"""

from __future__ import annotations

from typing import Any

from esvr.prompts import load_prompt

INITIAL = (
    "Step 1. The patient's issues and current state\n-Reasoning: The patient is stressed about work.\n"
    "Step 2. Key points of the reference response\n-Reasoning: The reference praises their effort.\n"
    "Step 3. Whether to use the reference response\n-Reasoning: Yes, the praise fits here.\n"
    "Step 4. The therapist's next strategy and utterance\n-Strategy: Affirmation\n"
    "-Response: The effort you put into your career shows real strength."
)
ALTERNATIVE = (
    "Step 3. Whether to use the reference response\n-Reasoning: No, a question fits better.\n"
    "Step 4. The therapist's next strategy and utterance\n-Strategy: Question\n"
    "-Response: What helps you feel calm in the evenings?"
)
CAREER_REPLY = "I want to work harder on my career and achieve my goals."
PLAIN_REPLY = "Okay, I guess that is true."
END_REPLY = "Thank you, this really helped me. [END]"


def _head(name: str) -> str:
    return load_prompt(name).strip()[:60]


def script(request: dict[str, Any]) -> str:
    msgs = request.get("messages", [])
    system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else ""
    users = [m["content"] for m in msgs if m["role"] == "user"]
    last = users[-1] if users else ""
    if system.startswith(_head("seeker/system.txt")):
        supporter_turns = len(users) - 1  # the first 'user' message is the fixed greeting
        if supporter_turns >= 3:
            return END_REPLY
        return CAREER_REPLY if "career" in last.lower() else PLAIN_REPLY
    if system.startswith(_head("supporter/system.txt")):
        return ALTERNATIVE if _head("supporter/alternative.txt")[:40] in last else INITIAL
    if system.startswith(_head("tvd/system.txt")):
        return "Achievement"
    if system.startswith(_head("rg/system.txt")):
        return "The work you put in matters, and it shows."
    if system.startswith(_head("judge_emotion/system.txt")):
        return "No, but the patient feels better."
    if "Answer Yes or No" in last and "Text:" in last:
        text = last.split("Text:", 1)[1].split("Does the writer", 1)[0].lower()
        return "Yes" if '"Achievement"' in last and "career" in text else "No"
    return "ok"


def personas() -> list[dict[str, Any]]:
    base = {"problem": "job crisis", "emotion": "anxiety", "age": 30, "gender": "female", "occupation": "designer"}
    return [
        {**base, "id": "p-train-1", "split": "train", "situation": "I lost my job last month and I feel useless."},
        {**base, "id": "p-train-2", "split": "train", "situation": "My manager ignores my work and I feel invisible."},
        {**base, "id": "p-dev-1", "split": "dev", "situation": "I failed an interview and I can't stop replaying it."},
    ]
