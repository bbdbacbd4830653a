"""Generation: policy models resolved and fingerprinted (models), the backends that sample
responses from them (backends: vLLM, transformers, an OpenAI-compatible server) and the HTTP
client they share with the judge (server). May import: errors, store, manifest.
"""
