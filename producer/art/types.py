"""ART's ``art.types``: the annotation aliases ART code uses, and trainq's own records under ART's names."""

from __future__ import annotations

from typing import Literal

from openai.types.chat.chat_completion import Choice as OpenAIChoice
from openai.types.chat.chat_completion_message_param import ChatCompletionMessageParam
from openai.types.chat.chat_completion_tool_param import ChatCompletionToolParam

from producer.types import Choice, LocalTrainResult, TrainConfig, TrainResult

__all__ = [
    "LocalTrainResult",
    "Message",
    "MessageOrChoice",
    "Messages",
    "MessagesAndChoices",
    "Tools",
    "TrainConfig",
    "TrainResult",
    "Verbosity",
]

Message = ChatCompletionMessageParam
MessageOrChoice = Message | OpenAIChoice | Choice
"""A chat message dict, an openai chat choice (converted to trainq's ``Choice``), or a ``Choice``."""
Messages = list[Message]
MessagesAndChoices = list[MessageOrChoice]
Tools = list[ChatCompletionToolParam]
Verbosity = Literal[0, 1, 2]
