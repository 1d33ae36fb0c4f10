"""Serving round trips: adapters through real inference engines (llama.cpp), compared with PEFT."""
