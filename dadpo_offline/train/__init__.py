"""Phase two: dSFT (makes the reference), then daDPO / dDPO / rDPO with only the policy in memory."""
