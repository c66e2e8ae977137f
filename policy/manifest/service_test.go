package manifest

import (
	"strings"
	"testing"
)

// TestLoadServices: Services are kept (a trace resolves them to pods), in
// the default namespace when none is given, and without a warning.
func TestLoadServices(t *testing.T) {
	in := `apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  selector: {app: db}
  ports: [{port: 5432}]
`
	s, err := Loader{Stdin: strings.NewReader(in)}.Load("-")
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Problems) != 0 {
		t.Errorf("problems: %v", s.Problems)
	}
	if len(s.Services) != 2 {
		t.Fatalf("services: %v", s.Services)
	}
	web, db := s.Services[0], s.Services[1]
	if web.Namespace != "shop" || web.Name != "web" || web.Spec.Selector["app"] != "web" || web.Spec.Ports[0].TargetPort.StrVal != "http" {
		t.Errorf("web: %+v", web)
	}
	if db.Namespace != "default" || db.Spec.Ports[0].Port != 5432 {
		t.Errorf("db: %+v", db)
	}
	if _, ok := s.Origin(Ref{Kind: KindService, Namespace: "shop", Name: "web"}); !ok {
		t.Errorf("no origin for Service shop/web")
	}
}
