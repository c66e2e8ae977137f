package controlplane

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/rest"
)

// InstallCRDs creates (or updates) every CustomResourceDefinition in the
// *.yaml and *.json files of dir and waits until each is Established and its
// resource is served. An invalid CRD, such as one whose CEL rules exceed the
// cost budget, fails with the API server's message.
func InstallCRDs(ctx context.Context, cfg *rest.Config, dir string) error {
	crds, err := readCRDs(dir)
	if err != nil {
		return err
	}
	if len(crds) == 0 {
		return fmt.Errorf("install CRDs: no CustomResourceDefinition in %s", dir)
	}
	client, err := apiextensionsclient.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("install CRDs: create client: %w", err)
	}
	for _, crd := range crds {
		if err := applyCRD(ctx, client, crd); err != nil {
			return err
		}
	}
	disco, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return fmt.Errorf("install CRDs: create discovery client: %w", err)
	}
	for _, crd := range crds {
		if err := waitEstablished(ctx, client, disco, crd); err != nil {
			return err
		}
	}
	return nil
}

func readCRDs(dir string) ([]*apiextensionsv1.CustomResourceDefinition, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read CRD dir: %w", err)
	}
	var crds []*apiextensionsv1.CustomResourceDefinition
	for _, e := range entries {
		ext := filepath.Ext(e.Name())
		if e.IsDir() || (ext != ".yaml" && ext != ".yml" && ext != ".json") {
			continue
		}
		path := filepath.Join(dir, e.Name())
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read CRD file: %w", err)
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
		for {
			crd := &apiextensionsv1.CustomResourceDefinition{}
			if err := dec.Decode(crd); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				return nil, fmt.Errorf("decode CRD in %s: %w", path, err)
			}
			if crd.Name == "" {
				continue // an empty document
			}
			if crd.Kind != "CustomResourceDefinition" {
				return nil, fmt.Errorf("decode CRD in %s: %s %q is not a CustomResourceDefinition", path, crd.Kind, crd.Name)
			}
			crds = append(crds, crd)
		}
	}
	return crds, nil
}

func applyCRD(ctx context.Context, client apiextensionsclient.Interface, crd *apiextensionsv1.CustomResourceDefinition) error {
	crds := client.ApiextensionsV1().CustomResourceDefinitions()
	_, err := crds.Create(ctx, crd, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		var current *apiextensionsv1.CustomResourceDefinition
		current, err = crds.Get(ctx, crd.Name, metav1.GetOptions{})
		if err == nil {
			crd = crd.DeepCopy()
			crd.ResourceVersion = current.ResourceVersion
			_, err = crds.Update(ctx, crd, metav1.UpdateOptions{})
		}
	}
	if err != nil {
		return fmt.Errorf("install CRD %s: %w", crd.Name, err)
	}
	return nil
}

func waitEstablished(ctx context.Context, client apiextensionsclient.Interface, disco discovery.DiscoveryInterface, crd *apiextensionsv1.CustomResourceDefinition) error {
	var last string
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		got, err := client.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, crd.Name, metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		established := false
		for _, c := range got.Status.Conditions {
			switch {
			case c.Type == apiextensionsv1.NamesAccepted && c.Status == apiextensionsv1.ConditionFalse:
				return false, fmt.Errorf("names not accepted: %s", c.Message)
			case c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue:
				established = true
			}
		}
		if !established {
			last = "not Established yet"
			return false, nil
		}
		// Established can precede the discovery document by a moment;
		// clients resolve kinds through discovery.
		for _, v := range crd.Spec.Versions {
			if !v.Served {
				continue
			}
			list, err := disco.ServerResourcesForGroupVersion(crd.Spec.Group + "/" + v.Name)
			if err != nil {
				last = err.Error()
				return false, nil
			}
			if !slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == crd.Spec.Names.Plural }) {
				last = fmt.Sprintf("%s/%s not in discovery yet", crd.Spec.Group, v.Name)
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("wait for CRD %s: %w (last: %s)", crd.Name, err, last)
	}
	return nil
}
