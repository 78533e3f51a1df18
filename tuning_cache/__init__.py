"""The shipped tuning tables (JSON), installed as package data; a package so that
``importlib.resources`` finds one real folder in every kind of install."""
