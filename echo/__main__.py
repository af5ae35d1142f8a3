"""`python -m sessiongate.echo`: the built-in agent on stdio."""

from sessiongate.echo.agent import main

if __name__ == "__main__":
    main()
