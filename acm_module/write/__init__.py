"""The record path: the writer reads the decision streams the store holds and feeds the sinks
(PostgreSQL/YugabyteDB, QuestDB, ClickHouse/chdb), with the migrations and `acm writer`/`acm db`.
Never imports control/; its periodic jobs are handed in by cli.py.
"""
