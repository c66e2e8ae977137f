// Command coredns is the lab clusters' DNS: CoreDNS built from its Go
// module with only the plugins a lab cluster uses. There is no forward
// plugin: a lab has no route out, so names outside cluster.local get
// SERVFAIL quickly instead of timing out.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// The plugins' order in a request's chain, as CoreDNS's plugin.cfg orders
// them.
func init() {
	dnsserver.Directives = []string{
		"reload",
		"health",
		"ready",
		"errors",
		"log",
		"cache",
		"loadbalance",
		"loop",
		"kubernetes",
	}
}

func main() { coremain.Run() }
