"""What each model family is, NumPy only, so that every trainer and file reader can import it: its config and
named sizes (descriptors), its parameter table in llm.c's file order, its seeded init. gpt2.py (GPT-2 and GPT-3
sizes), llama3.py (Llama 3). How the mainline runs a family on the GPU is in llmpy/models/.
"""
