from app.cli.main import app

app()
