"""The firewall controller: keeps "a sandbox uid reaches the proxy and nothing else" in the kernel.

``plan`` turns the config into iptables-save lines (pure); ``backend_restore`` and
``backend_iptc`` read and write them; ``detect`` picks a backend the host's tools can see;
``sync`` reconciles (plan -> read -> diff -> apply -> verify), reports status and flushes.
"""
