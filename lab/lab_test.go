package lab

import "testing"

func TestLabNetnsMatchesOnlyThisLab(t *testing.T) {
	for name, want := range map[string]bool{
		"veil-lab-ul":             true,
		"veil-lab-node-1":         true,
		"veil-lab-node-12":        true,
		"veil-lab-p-demo-backend": true,
		"veil-lab-b-node-1":       false,
		"veil-lab-b-ul":           false,
		"veil-lab-node-x":         false,
		"veil-labnode-1":          false,
		"other":                   false,
	} {
		if got := labNetns("veil-lab", name); got != want {
			t.Errorf("labNetns(veil-lab, %s) = %v, want %v", name, got, want)
		}
	}
}
