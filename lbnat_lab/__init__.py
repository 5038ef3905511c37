"""The lab around lbnat, not lbnat itself: what the tests, the demo, the benchmark, the
screenshots and the provisioning scripts run beside the load balancer.

- `chat`: the chat server and client (the backend application and the clients of the demo);
  ``python -m lbnat_lab.chat`` or the ``lbnat-chat`` command.
- `udpecho`: a UDP echo server that answers with its name (``python -m lbnat_lab.udpecho``).
- `netns`: scripts/lab.sh's network namespaces as a Python object, `Lab` (from a checkout).
"""
