"""Differential privacy at the sites: accounting, the signed per-site ledger, DP-SGD set-up, audits.

Modules (Flower-free, callable from tests directly):
    accounting   epsilon of a mechanism history with Opacus' accountants (RDP, PRV); noise planning
    independent  the same recomputed with Google's dp-accounting (RDP, PLD) for `medfed audit`
    ledger       SQLite, append-only, hash-chained, Ed25519-signed record of every release
    empirical    one-run empirical lower bound on epsilon (Steinke, Nasr & Jagielski, 2023)
"""
