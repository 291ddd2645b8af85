.PHONY: setup serve test services
setup:
	bash scripts/setup.sh
serve:
	bash scripts/serve.sh
test:
	bash scripts/test.sh
services:
	bash scripts/services.sh
