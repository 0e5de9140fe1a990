"""Model families. For each, its description: config, descriptors, parameter table (llm.c's file order) and init,
NumPy only, so that every trainer and file reader can import it (llama3.py; GPT-2's is llmpy/config.py); and its
mainline model on torch and our kernels, over llmpy/runtime.py (gpt2.py; Llama 3's is to come).
"""
