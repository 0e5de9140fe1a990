"""Model families, one module each: its config, descriptors, parameter table (llm.c's file order) and init.

NumPy only, so every trainer and file reader can import them. GPT-2's still live in llmpy/config.py.
"""
