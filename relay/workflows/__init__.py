"""The four workflows: FedAvg and ensemble fan in to the aggregator; SWT and CWT travel a ring."""
