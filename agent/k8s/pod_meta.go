package k8s

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// podMeta is a PodInfo as the metav1.Object that the informer's store and
// queue read (meta.Accessor, through GetObjectMeta) to key it and to learn
// its version. Being the PodInfo itself, it costs no allocation: the store
// and queue read it several times for every pod they take in, which as a
// metav1.ObjectMeta made per call was about 0.2 s of a restart at 150,000
// pods. It names the pod by its store key with no namespace, so that
// cache.MetaNamespaceKeyFunc returns the key the PodInfo already holds
// (see GetObjectMeta). A cached object is never written: the setters do
// nothing, as metav1.Common documents for a field an object does not
// hold.
type podMeta PodInfo

var _ metav1.Object = (*podMeta)(nil)

func (m *podMeta) info() *PodInfo { return (*PodInfo)(m) }

func (m *podMeta) GetNamespace() string                          { return "" }
func (m *podMeta) SetNamespace(string)                           {}
func (m *podMeta) GetName() string                               { return m.key }
func (m *podMeta) SetName(string)                                {}
func (m *podMeta) GetGenerateName() string                       { return "" }
func (m *podMeta) SetGenerateName(string)                        {}
func (m *podMeta) GetUID() types.UID                             { return "" }
func (m *podMeta) SetUID(types.UID)                              {}
func (m *podMeta) GetResourceVersion() string                    { return m.info().ResourceVersion() }
func (m *podMeta) SetResourceVersion(string)                     {}
func (m *podMeta) GetGeneration() int64                          { return 0 }
func (m *podMeta) SetGeneration(int64)                           {}
func (m *podMeta) GetSelfLink() string                           { return "" }
func (m *podMeta) SetSelfLink(string)                            {}
func (m *podMeta) GetCreationTimestamp() metav1.Time             { return metav1.Time{} }
func (m *podMeta) SetCreationTimestamp(metav1.Time)              {}
func (m *podMeta) GetDeletionTimestamp() *metav1.Time            { return nil }
func (m *podMeta) SetDeletionTimestamp(*metav1.Time)             {}
func (m *podMeta) GetDeletionGracePeriodSeconds() *int64         { return nil }
func (m *podMeta) SetDeletionGracePeriodSeconds(*int64)          {}
func (m *podMeta) GetLabels() map[string]string                  { return m.labels }
func (m *podMeta) SetLabels(map[string]string)                   {}
func (m *podMeta) GetAnnotations() map[string]string             { return m.info().Annotations() }
func (m *podMeta) SetAnnotations(map[string]string)              {}
func (m *podMeta) GetFinalizers() []string                       { return nil }
func (m *podMeta) SetFinalizers([]string)                        {}
func (m *podMeta) GetOwnerReferences() []metav1.OwnerReference   { return nil }
func (m *podMeta) SetOwnerReferences([]metav1.OwnerReference)    {}
func (m *podMeta) GetManagedFields() []metav1.ManagedFieldsEntry { return nil }
func (m *podMeta) SetManagedFields([]metav1.ManagedFieldsEntry)  {}
