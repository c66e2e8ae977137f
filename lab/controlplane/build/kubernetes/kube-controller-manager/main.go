// Command kube-controller-manager is the upstream kube-controller-manager built from the k8s.io/kubernetes
// module pinned in ../go.mod, for Veil's local lab (node IPAM, EndpointSlices, service-account tokens, namespace lifecycle, garbage collection).
package main

import (
	"os"
	_ "time/tzdata" // CronJob time zones, as upstream links them

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
