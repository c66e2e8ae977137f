package cni

import (
	"encoding/json"
	"fmt"
	"net/netip"

	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/utils"
	"github.com/containernetworking/cni/pkg/version"

	agentv1 "github.com/veilmesh/veil/api/agent/v1"
)

// GatewayIP is every pod's next hop (see package podnet).
var GatewayIP = netip.MustParseAddr("169.254.1.1")

// Request is a CNI call as the agent sees it, validated.
type Request struct {
	ContainerID string
	// Netns is CNI_NETNS; it may be empty on DEL.
	Netns  string
	IfName string
	// Pod identity from CNI_ARGS; set by kubelet, empty for other callers.
	PodNamespace, PodName, PodUID string
	Config                        *NetConf
}

// k8sArgs are the CNI_ARGS kubelet and CRI runtimes pass; types.LoadArgs
// matches keys to field names, hence the spelling.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_NAME               types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
}

// RequestError says what is wrong with a CNI call; the agent answers it with
// codes.InvalidArgument, which veil-cni turns into CNI error code 7.
type RequestError struct {
	Msg string
}

func (e *RequestError) Error() string { return e.Msg }

// ParseRequest validates a CNI call forwarded by veil-cni. Errors are
// *ConfigError (the network config) or *RequestError (the environment).
func ParseRequest(req *agentv1.CNIRequest) (Request, error) {
	if req == nil {
		return Request{}, &RequestError{Msg: "empty CNI request"}
	}
	if err := utils.ValidateContainerID(req.GetContainerId()); err != nil {
		return Request{}, &RequestError{Msg: fmt.Sprintf("CNI_CONTAINERID %q: %s", req.GetContainerId(), err.Msg)}
	}
	if err := utils.ValidateInterfaceName(req.GetIfname()); err != nil {
		return Request{}, &RequestError{Msg: fmt.Sprintf("CNI_IFNAME %q: %s", req.GetIfname(), err.Msg)}
	}
	conf, err := ParseConfig(req.GetConfig())
	if err != nil {
		return Request{}, err
	}
	var args k8sArgs
	if req.GetArgs() != "" {
		if err := types.LoadArgs(req.GetArgs(), &args); err != nil {
			return Request{}, &RequestError{Msg: fmt.Sprintf("CNI_ARGS %q: %v (set IgnoreUnknown=1 to pass other keys)", req.GetArgs(), err)}
		}
	}
	return Request{
		ContainerID:  req.GetContainerId(),
		Netns:        req.GetNetns(),
		IfName:       req.GetIfname(),
		PodNamespace: string(args.K8S_POD_NAMESPACE),
		PodName:      string(args.K8S_POD_NAME),
		PodUID:       string(args.K8S_POD_UID),
		Config:       conf,
	}, nil
}

// requirePod is for ADD: an endpoint without a pod has no identity.
func (r *Request) requirePod() error {
	if r.Netns == "" {
		return &RequestError{Msg: "CNI_NETNS is empty: ADD and CHECK need the pod's network namespace"}
	}
	if r.PodNamespace == "" || r.PodName == "" {
		return &RequestError{Msg: "CNI_ARGS lacks K8S_POD_NAMESPACE and K8S_POD_NAME: veil-cni wires Kubernetes pods, " +
			"and the container runtime must pass them (kubelet's CRI runtimes do)"}
	}
	return nil
}

// prevResult returns the config's prevResult as a CNI 1.0 result, or nil.
func (c *NetConf) prevResult() (*types100.Result, error) {
	if c.RawPrevResult == nil {
		return nil, nil
	}
	data, err := json.Marshal(c.RawPrevResult)
	if err != nil {
		return nil, configErrorf("prevResult: %v", err)
	}
	res, err := version.NewResult(c.CNIVersion, data)
	if err != nil {
		return nil, configErrorf("prevResult: %v", err)
	}
	r100, err := types100.NewResultFromResult(res)
	if err != nil {
		return nil, configErrorf("prevResult: %v", err)
	}
	return r100, nil
}
