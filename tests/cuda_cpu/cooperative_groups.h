// cooperative_groups' thread block clusters for cuda_cpu.h: the cluster a block was launched in
// (WKV_LAUNCH_CLUSTER; a plain launch makes every block a cluster of one, as on the hardware), its
// barrier, and pointers into another block's shared memory. A pointer mapped to a rank outside the
// cluster, or one that is not into the block's own shared memory, fails the run (the hardware faults).
#pragma once

#define _CG_HAS_CLUSTER_GROUP 1  // as the real header defines it for sm_90 and later

namespace cooperative_groups {

struct cluster_group {
    unsigned block_rank() const { return cuda_cpu::block->rank; }
    unsigned num_blocks() const { return unsigned(cuda_cpu::block->cluster->blocks.size()); }
    void sync() const { cuda_cpu::block->cluster->all->arrive_and_wait(); }

    template <typename T>
    T* map_shared_rank(T* p, unsigned rank) const {
        const cuda_cpu::Block* self = cuda_cpu::block;
        const auto* at = reinterpret_cast<const unsigned char*>(p);
        if (at < self->smem_base || at >= self->smem_base + self->smem_bytes)
            cuda_cpu::fail("map_shared_rank: the pointer is not into this block's shared memory");
        if (rank >= num_blocks()) cuda_cpu::fail("map_shared_rank: no block of that rank in this cluster");
        return reinterpret_cast<T*>(self->cluster->blocks[rank]->smem_base + (at - self->smem_base));
    }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
