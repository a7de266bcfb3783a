"""Test-time defences (TPT, C-TPT, MTA, R-TPT, A-TPT): `tta.procedures` holds the registry."""
