"""The mainline's model families on torch and our kernels, over llmpy/runtime.py: gpt2.py, llama3.py. Each holds
its activations and writes its forward and backward out layer by layer; what a family is (config, parameter table,
init) is in llmpy/configs/.
"""
