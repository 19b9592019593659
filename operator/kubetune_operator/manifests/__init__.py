"""Files generated from the code rather than run by the operator: the FineTuneJob CRD (from the
spec model) and the Grafana dashboard and Prometheus alerts the chart ships."""
