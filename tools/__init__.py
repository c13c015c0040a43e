"""Developer tools: environment setup, random-weight test models, the headless demo runner."""
