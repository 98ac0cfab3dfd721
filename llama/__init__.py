"""Llama 2 inference: the reference's API, on CPU or GPU, one process or many."""

from llama.generation import ChatPrediction, CompletionPrediction, Dialog, Llama, Message
from llama.model import ModelArgs, Transformer
from llama.session import ChatSession
from llama.tokenizer import Tokenizer

__all__ = [
    "ChatPrediction",
    "ChatSession",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "Transformer",
    "Tokenizer",
]
