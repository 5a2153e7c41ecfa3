"""The simulated world of the demo and the tests: everything looprl needs to run end to end with
no real product, users or model behind it. No stage (ingest, storage, reward, policy, serving,
kernels) imports it: they see only a base checkpoint directory, events and the registry.

- ``corpus``: the toy English of the tiny base (question/answer documents about a few topics,
  cheerful words in a minority of sentences) and the grammar of the shipped prompt set;
- ``base``: building and pre-training the tiny Mixture-of-Experts base on that corpus
  (``looprl init``);
- ``preference``: the hidden user preferences (``--preference module:function``);
- ``simulator``: the simulated product users of ``looprl demo`` / ``looprl simulate``, and
  ``records``: what they leave in the workspace (read by the demo's live view and report);
- ``feedback``: synthetic feedback events from a hidden preference, written into a real event
  log, for the reward stage's tests and benchmark;
- ``scoring``: a programmatic reward with a known optimum (``--scorer cheerful``).
"""
