"""Compliance: daily statistics from QuestDB and the NCC reports (`acm report`)."""
